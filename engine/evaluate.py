"""In-training evaluation and model selection.

:func:`evaluation_splits` gives the splits evaluated during training (on the main process):
the test split, with only its first gallery trial as the released CMFN train.py does, and the
held-out validation identities when ``SOLVER.SELECT_BY`` is ``val``. :func:`evaluate` runs them
without flip TTA and with the ``TEST.FEATURE`` embedding, and writes one record per split to
the log, tensorboard and ``metrics.jsonl`` (figures as fractions). :func:`update_best` applies
the selection rule: ``test`` (released: on the test set, so the selected figures are
optimistic), ``val`` or ``last``.
"""
import dataclasses
import time

from evaluation.trials import SCALARS
from utils.io import append_jsonl


def evaluation_splits(cfg):
    """name -> (TestSplit, trial info) evaluated during training."""
    from data import build_test_split, build_val_split
    from data.registry import DATASETS

    test = build_test_split(cfg)
    if len(test.trials) > 1:
        test = dataclasses.replace(test, trials=test.trials[:1])
    splits = {"test": (test, DATASETS.get(cfg.DATASET.NAME).eval_info(cfg))}
    if cfg.SOLVER.SELECT_BY == "val":
        splits["val"] = (build_val_split(cfg), {"val_ids": int(cfg.DATASET.VAL_IDS)})
    return splits


def evaluate(model, splits, cfg, device, epoch, logger, tb, metrics_path):
    """Evaluate every split; append to metrics.jsonl; return name -> record."""
    from evaluation.embeddings import evaluate_split

    records = {}
    feature = cfg.TEST.FEATURE or type(model).default_embedding
    for name, (split, info) in splits.items():
        start = time.perf_counter()
        mean = evaluate_split(model, split, cfg, device, flip=False)["mean"]
        record = {"epoch": int(epoch), "split": name}
        if getattr(model, "method_label", ""):
            record["method_label"] = model.method_label
        record.update({k: float(mean[k]) if k in mean else None for k in SCALARS})  # rank20 needs MAX_RANK 20
        record.update(info)
        record.update({"feature": feature, "flip": False, "num_query": len(split.query)})
        append_jsonl(metrics_path, record)
        records[name] = record
        label = "untrained" if epoch < 0 else "epoch %d" % epoch
        logger.info("eval %s (%s, %s, no flip): Rank-1 %.2f%% | Rank-5 %.2f%% | Rank-10 %.2f%% | Rank-20 %.2f%% | "
                    "mAP %.2f%% | mINP %.2f%%  [%.1fs]", name, label, feature,
                    *(100 * (record[k] or 0.0) for k in SCALARS), time.perf_counter() - start)
        tb.add_scalars("eval_%s" % name, {k: record[k] for k in ("rank1", "mAP", "mINP")}, epoch + 1)
    return records


def evaluation_due(cfg, epoch):
    solver = cfg.SOLVER
    if epoch == solver.MAX_EPOCHS - 1:
        return True
    return epoch >= solver.EVAL_START and (epoch - solver.EVAL_START) % solver.EVAL_PERIOD == 0


def update_best(cfg, progress, records, epoch):
    """Apply SOLVER.SELECT_BY to this epoch's records (may be empty); True when best.pth is to be written."""
    if cfg.SOLVER.SELECT_BY == "last":
        progress.best_epoch = epoch
        return True
    chosen = records.get(cfg.SOLVER.SELECT_BY)
    if chosen is None:
        return False
    value = chosen[cfg.SOLVER.BEST_METRIC]
    if progress.best_value is None or value > progress.best_value:
        progress.best_value, progress.best_epoch = value, epoch
        return True
    return False
