"""Evaluation and model selection in the unsupervised stages.

:func:`evaluation_splits`: the test split with all its gallery trials (TEST.NUM_TRIALS; the
released scripts evaluate SYSU's 10 all-search trials and RegDB's trial lists), and the
held-out validation identities when SOLVER.SELECT_BY is ``val``. :func:`evaluate` runs them with
the test protocol of the config (TokenMatcher: 384x128 LANCZOS, flip average of the raw
descriptors, TEST.FLIP_MODE average_raw) through the project's evaluator and writes one record
per split to the log, tensorboard and ``metrics.jsonl``: ``{"kind": "eval", "stage",
"stage_index", "epoch", "split", "evaluated", "rank1", ..., "mAP", "mINP", "selection"}`` (figures as
fractions; ``evaluated`` is ``encoder`` or ``ema``, CMAG's teacher; ``method_label`` when the
model has one).

Stages 1 and 2 are evaluated every USL.EVAL_PERIOD epochs from USL.EVAL_START and at their
last epoch (:func:`evaluation_due`); camera-local runs are not evaluated (their model is
discarded). :func:`update_best` applies SOLVER.SELECT_BY per stage with the stage's metric
(USL.STAGE1.BEST_METRIC mAP, USL.STAGE2.BEST_METRIC Rank-1, as released): ``test`` (released:
on the test set, so the selected figures are optimistic, and logged as such), ``val`` or
``last``.
"""
import time

from evaluation.trials import SCALARS
from utils.io import append_jsonl


def evaluation_splits(cfg):
    """name -> (TestSplit, info) evaluated during training (module docstring)."""
    from data import build_test_split, build_val_split
    from data.registry import DATASETS

    splits = {"test": (build_test_split(cfg), DATASETS.get(cfg.DATASET.NAME).eval_info(cfg))}
    if cfg.SOLVER.SELECT_BY == "val":
        splits["val"] = (build_val_split(cfg), {"val_ids": int(cfg.DATASET.VAL_IDS)})
    return splits


def evaluation_due(cfg, stage, epoch):
    if stage.kind == "camera":
        return False
    if epoch == stage.epochs - 1:
        return True
    start, period = cfg.USL.EVAL_START, max(1, cfg.USL.EVAL_PERIOD)
    return epoch >= start and (epoch - start) % period == 0


def evaluate(model, splits, cfg, device, stage_name, stage_index, epoch, logger, tb, metrics_path, step,
             evaluated="encoder"):
    """Evaluate every split; append to metrics.jsonl; return name -> record. `evaluated` names
    the weights (``encoder``, or ``ema`` for CMAG's teacher)."""
    from evaluation.embeddings import evaluate_split

    records = {}
    flip = "flip %s" % cfg.TEST.FLIP_MODE if cfg.TEST.FLIP else "no flip"
    for name, (split, info) in splits.items():
        start = time.perf_counter()
        mean = evaluate_split(model, split, cfg, device)["mean"]
        record = {"kind": "eval", "stage": stage_name, "stage_index": int(stage_index), "epoch": int(epoch),
                  "split": name, "evaluated": evaluated}
        if getattr(model, "method_label", ""):
            record["method_label"] = model.method_label
        record.update({k: float(mean[k]) if k in mean else None for k in SCALARS})
        record.update(info)
        record.update({"selection": cfg.SOLVER.SELECT_BY, "flip": bool(cfg.TEST.FLIP),
                       "flip_mode": cfg.TEST.FLIP_MODE, "trials": len(split.trials), "num_query": len(split.query)})
        append_jsonl(metrics_path, record)
        records[name] = record
        where = "untrained model" if epoch < 0 else "%s epoch %d" % (stage_name, epoch)
        logger.info("eval %s (%s%s, %d gallery trial(s), %s)%s: Rank-1 %.2f%% | Rank-5 %.2f%% | Rank-10 %.2f%% | "
                    "Rank-20 %.2f%% | mAP %.2f%% | mINP %.2f%%  [%.1fs]", name, where,
                    ", EMA teacher" if evaluated == "ema" else "", len(split.trials), flip,
                    " [model selection on the TEST set]" if name == "test" and cfg.SOLVER.SELECT_BY == "test" else "",
                    *(100 * (record[k] or 0.0) for k in SCALARS), time.perf_counter() - start)
        tb.add_scalars("eval_%s/%s" % (name, stage_name), {k: record[k] for k in ("rank1", "mAP", "mINP")}, step)
    return records


def update_best(cfg, best, stage, records, epoch):
    """Apply SOLVER.SELECT_BY to this epoch's records of `stage` (may be empty); `best` maps stage
    names to {"value", "epoch", "metric", "select_by"}; True when the stage's best model is this one."""
    select_by = cfg.SOLVER.SELECT_BY
    if select_by == "last":
        best[stage.name] = {"value": None, "epoch": int(epoch), "metric": stage.best_metric, "select_by": select_by}
        return True
    chosen = records.get(select_by)
    if chosen is None:
        return False
    value = chosen[stage.best_metric]
    current = best.get(stage.name)
    if current is None or current["value"] is None or value > current["value"]:
        best[stage.name] = {"value": float(value), "epoch": int(epoch), "metric": stage.best_metric,
                            "select_by": select_by}
        return True
    return False
