"""Evaluate trained checkpoints with the standard protocols (SYSU-MM01, RegDB, LLCM, ...).

Examples::

    python test.py --dataset sysu --mode all --resume runs/sysu/best.pth
    python test.py --dataset sysu --mode indoor --gallery official --shots 10 --resume CKPT
    python test.py --dataset regdb --trial 3 --direction ir2vis --resume runs/regdb_trial3/best.pth
    python test.py --dataset regdb --trial all            # runs/regdb_trial{1..10}/best.pth
    python test.py --dataset regdb --trial all --resume 'ckpts/trial{trial}.pth'
    python test.py --dataset llcm --direction vis2ir --resume CKPT TEST.FEATURE mix
    python test.py --method ivreid --dataset sysu --resume runs/ivreid_sysu/best.pth
    python test.py --method tokenmatcher --dataset sysu --resume runs/tokenmatcher_sysu/best.pth
    python test.py --method tokenmatcher --dataset regdb --trial all  # runs/tokenmatcher_regdb_trial{1..10}/best.pth

The model (its MODEL.* config and weights) comes from the checkpoint; the dataset and test
settings come from the command line (--method/--dataset/--config, the flags below, then
trailing KEY VALUE overrides). The embedding (TEST.FEATURE) is one of the model's presets,
by default the model's own. Query features and the features of every gallery image any trial
uses are extracted once; each trial is a column subset of one distance matrix
(evaluation.embeddings.evaluate_features). TokenMatcher / CMAG checkpoints (train_usl.py's,
or released ones converted with tools/convert_official_checkpoint.py --method tokenmatcher|cmag)
are tested with the released protocol of their preset: 384x128 LANCZOS, the raw descriptors of
an image and its mirror averaged, then L2-normalised (TEST.FLIP_MODE average_raw).

Output: the table (per trial with --verbose) and a JSON file with every figure (fractions
0..1) and the exact protocol, default ``<checkpoint dir>/test_<dataset>_<protocol tags>.json``.
--save-features DIR keeps the features (.npy) with ids, cameras, paths and trials; --visrank K
draws ranked galleries; --plot-cmc draws the CMC curve.
"""
import argparse
import datetime
import os
import sys
import time

import numpy as np
import torch

from engine.checkpoint import file_sha256, load_checkpoint
from engine.distributed import resolve_device
from evaluation.embeddings import embedding_weights, evaluate_features, extract_split_features, save_features
from evaluation.trials import SCALARS
from utils.config import CHOICES, add_config_arguments, config_from_args, config_from_string, default_output_dir
from utils.errors import UserError, run_cli
from utils.io import save_json


class TestError(UserError):
    """A bad combination of options or a missing input file; the message says which."""

    __test__ = False  # not a pytest test class


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Trailing KEY VALUE pairs override config keys (after the flags).",
    )
    parser.add_argument("--resume", help="checkpoint to evaluate; for --trial all a pattern with {trial}")
    parser.add_argument("--mode", choices=CHOICES["TEST.MODE"], help="SYSU search mode (TEST.MODE)")
    parser.add_argument("--gallery", choices=CHOICES["TEST.GALLERY"], help="gallery sampling (TEST.GALLERY)")
    parser.add_argument("--shots", type=int, help="gallery images per id and camera, e.g. 1 or 10 "
                        "(TEST.SHOTS)")
    parser.add_argument("--direction", choices=CHOICES["TEST.DIRECTION"], help="query -> gallery modality "
                        "(TEST.DIRECTION)")
    parser.add_argument("--trial", help="RegDB trial 1..10 (DATASET.TRIAL) or 'all'")
    parser.add_argument("--num-trials", type=int, help="SYSU/LLCM gallery trials (TEST.NUM_TRIALS)")
    parser.add_argument("--feature", help="embedding preset of the model used for ranking (TEST.FEATURE; CMFN: "
                        "sum6, mix, orig, pool, bn; IV-REID: bn, pool; TokenMatcher: feat)")
    parser.add_argument("--distance", choices=CHOICES["TEST.DISTANCE"], help="TEST.DISTANCE")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (TEST.RERANK)")
    parser.add_argument("--no-flip", action="store_true", help="no flip TTA (TEST.FLIP False)")
    parser.add_argument("--flip-mode", choices=CHOICES["TEST.FLIP_MODE"], help="TEST.FLIP_MODE")
    parser.add_argument("--amp", choices=CHOICES["TEST.AMP"], help="autocast during extraction (TEST.AMP)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (DEVICE)")
    parser.add_argument("--output", help="result JSON path")
    parser.add_argument("--save-features", metavar="DIR", help="save features, ids, cameras, paths, trials")
    parser.add_argument("--visrank", type=int, metavar="K", help="draw the top-K gallery of chosen queries")
    parser.add_argument("--queries", default="8", help="--visrank queries: a count or comma-separated indices")
    parser.add_argument("--plot-cmc", action="store_true", help="write a CMC plot next to the JSON")
    parser.add_argument("--verbose", action="store_true", help="print every trial")
    add_config_arguments(parser)
    return parser


def flag_overrides(args):
    """KEY VALUE pairs for the flags that were given."""
    opts = []
    for flag, key in (("mode", "TEST.MODE"), ("gallery", "TEST.GALLERY"), ("shots", "TEST.SHOTS"),
                      ("direction", "TEST.DIRECTION"), ("num_trials", "TEST.NUM_TRIALS"),
                      ("feature", "TEST.FEATURE"), ("distance", "TEST.DISTANCE"),
                      ("flip_mode", "TEST.FLIP_MODE"), ("amp", "TEST.AMP"), ("device", "DEVICE")):
        value = getattr(args, flag)
        if value is not None:
            opts += [key, str(value)]
    if args.rerank:
        opts += ["TEST.RERANK", "True"]
    if args.no_flip:
        opts += ["TEST.FLIP", "False"]
    if args.trial is not None and args.trial != "all":
        opts += ["DATASET.TRIAL", args.trial]
    return opts


def checkpoint_for(args, cfg, trial):
    """Checkpoint path of one evaluation (`trial` None for a dataset without list trials)."""
    if args.resume:
        if "{trial}" in args.resume:
            if trial is None:
                raise TestError("--resume %s contains {trial} but %s has no per-trial checkpoints"
                                % (args.resume, cfg.DATASET.NAME))
            return args.resume.replace("{trial}", str(trial))
        if args.trial == "all":
            raise TestError("--trial all needs one checkpoint per trial: give --resume a pattern "
                            "with {trial} (e.g. runs/regdb_trial{trial}/best.pth) or omit --resume "
                            "to use runs/regdb_trial<N>/best.pth")
        return args.resume
    if args.trial == "all":
        if cfg.OUTPUT_DIR:
            raise TestError("OUTPUT_DIR is set (%s), so every trial would read %s; give --resume a pattern "
                            "such as '<root>/regdb_trial{trial}/best.pth'"
                            % (cfg.OUTPUT_DIR, os.path.join(cfg.OUTPUT_DIR, "best.pth")))
        return os.path.join(default_output_dir(cfg), "best.pth")
    raise TestError("--resume CHECKPOINT is required (the checkpoint to evaluate)")


def default_output_path(cfg, dataset_cls, default_embedding, ckpt_paths, trials):
    """<checkpoint dir>/test_<dataset>_<protocol tags>.json (tags only for non-defaults)."""
    tags = [cfg.DATASET.NAME] + dataset_cls.result_tags(cfg)
    if trials != [None]:
        tags.append("trials" if len(trials) > 1 else "trial%d" % trials[0])
    if cfg.TEST.FEATURE and cfg.TEST.FEATURE != default_embedding:
        tags.append(cfg.TEST.FEATURE)
    if cfg.TEST.DISTANCE != "cosine":
        tags.append(cfg.TEST.DISTANCE)
    if not cfg.TEST.FLIP:
        tags.append("noflip")
    elif cfg.TEST.FLIP_MODE != "sum":
        tags.append("flip" + cfg.TEST.FLIP_MODE)
    if cfg.TEST.RERANK:
        tags.append("rerank")
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in ckpt_paths])
    return os.path.join(folder, "test_%s.json" % "_".join(tags))


def protocol_settings(cfg, model):
    t = cfg.TEST
    preset = t.FEATURE or type(model).default_embedding
    label = getattr(model, "method_label", "")
    return {
        "method": cfg.METHOD,
        **({"method_label": label} if label else {}),
        "dataset": cfg.DATASET.NAME,
        "root": cfg.DATASET.ROOT,
        "mode": t.MODE,
        "direction": t.DIRECTION,
        "gallery": t.GALLERY,
        "shots": t.SHOTS,
        "num_trials": t.NUM_TRIALS,
        "trial_seeds": list(t.TRIAL_SEEDS),
        "feature": preset,
        "embedding": {"model": type(model).__name__, "preset": preset,
                      "weights": [[name, w] for name, w in embedding_weights(model, preset)]},
        "distance": t.DISTANCE,
        "flip": t.FLIP,
        "flip_mode": t.FLIP_MODE,
        "distance_dtype": t.DISTANCE_DTYPE,
        "rerank": {"k1": t.RERANK_K1, "k2": t.RERANK_K2, "lambda": t.RERANK_LAMBDA, "expansion": t.RERANK_EXPANSION,
                   "distance": "sqeuclidean"}
        if t.RERANK
        else False,
        "amp": t.AMP,
        "image_size": list(cfg.INPUT.SIZE_TEST),
        "pixel_mean": list(cfg.INPUT.PIXEL_MEAN),
        "pixel_std": list(cfg.INPUT.PIXEL_STD),
        "max_rank": t.MAX_RANK,
    }


def aggregate(per_trial):
    """Mean and population standard deviation (ddof 0, as evaluation.trials) of per-trial figures."""
    keys = [k for k in per_trial[0] if k in SCALARS]
    mean = {k: float(np.mean([r[k] for r in per_trial])) for k in keys}
    std = {k: float(np.std([r[k] for r in per_trial])) for k in keys}
    cmc = np.array([r["cmc"] for r in per_trial], dtype=np.float64)
    mean["cmc"], std["cmc"] = cmc.mean(0).tolist(), cmc.std(0).tolist()
    return mean, std


def load_model_checked(path, cfg, device):
    """The model of checkpoint `path` on `device`, plus its checkpoint metadata."""
    from model import load_model

    if not os.path.isfile(path):
        raise TestError("checkpoint not found: %s" % path)
    ckpt = load_checkpoint(path)
    ckpt_cfg = config_from_string(ckpt["config"], source=path)
    if list(ckpt_cfg.INPUT.SIZE_TEST) != list(cfg.INPUT.SIZE_TEST):
        print("note: %s was configured for test size %s; testing at %s (INPUT.SIZE_TEST)"
              % (path, list(ckpt_cfg.INPUT.SIZE_TEST), list(cfg.INPUT.SIZE_TEST)))
    if ckpt_cfg.DATASET.NAME != cfg.DATASET.NAME:
        print("note: %s was trained on %s; testing on %s" % (path, ckpt_cfg.DATASET.NAME, cfg.DATASET.NAME))
    meta = {
        "path": os.path.abspath(path),
        "sha256": file_sha256(path),
        "epoch": int(ckpt.get("epoch", -1)),
        "model": ckpt_cfg.MODEL.NAME,
        "backbone": ckpt_cfg.MODEL.BACKBONE,
        "trained_on": ckpt_cfg.DATASET.NAME,
    }
    del ckpt
    model = load_model(path, map_location="cpu").to(device)
    model.eval()
    return model, meta


def run_split(model, split, cfg, device, ckpt_path, all_sets=False):
    """Extract the split's features once and evaluate every gallery trial; only the sets of the
    embedding are kept unless `all_sets` (--save-features writes every set)."""
    weights = embedding_weights(model, cfg.TEST.FEATURE)
    t0 = time.time()
    qfeats, gfeats, used, trials = extract_split_features(model, split, cfg, device,
                                                          keep=None if all_sets else {n for n, _ in weights})
    t1 = time.time()
    for side, feats in (("query", qfeats), ("gallery", gfeats)):
        for name, f in feats.items():
            bad = int((~torch.isfinite(f).all(dim=1)).sum())
            if bad:
                raise TestError("%s: %d %s images have non-finite %s features (diverged or corrupt weights?)"
                                % (ckpt_path, bad, side, name))
    result = evaluate_features(qfeats, gfeats, split, cfg, weights, used, trials, device=device)
    t2 = time.time()
    timing = {"extract_s": round(t1 - t0, 3), "metric_s": round(t2 - t1, 3),
              "images": len(split.query) + len(used)}
    return qfeats, gfeats, used, trials, result, timing


def visualize(args, cfg, split, used, trials, distmat, out_stem):
    from evaluation.plots import parse_queries, save_rank_grids

    cols = trials[0]
    gallery_idx = used[cols]
    h, w = cfg.INPUT.SIZE_TEST
    return save_rank_grids(
        distmat[:, cols],
        {"paths": split.query.paths, "pids": split.query.pids, "camids": split.query.camids,
         "modality": split.query_modality},
        {"paths": [split.gallery.paths[i] for i in gallery_idx], "pids": split.gallery.pids[gallery_idx],
         "camids": split.gallery.camids[gallery_idx], "modality": split.gallery_modality},
        split.protocol, out_stem + "_ranks", k=args.visrank, queries=parse_queries(args.queries),
        image_size=(64, max(1, round(64 * h / w))),
    )


def main(argv=None):
    from data import build_test_split
    from data.registry import DATASETS

    args = build_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args, flag_overrides(args), check_feature=False)
    dataset_cls = DATASETS.get(cfg.DATASET.NAME)
    dataset_cls.prepare(cfg)
    trials = dataset_cls.test_runs(cfg, args.trial)
    run_cfgs = [dataset_cls.trial_config(cfg, t) for t in trials]
    ckpt_paths = [checkpoint_for(args, c, t) for c, t in zip(run_cfgs, trials)]
    missing = [p for p in ckpt_paths if not os.path.isfile(p)]
    if missing:
        raise TestError("checkpoint not found: %s%s" % (
            missing[0], "" if len(missing) == 1 else " (and %d more: %s)" % (len(missing) - 1, ", ".join(missing[1:]))))
    device = resolve_device(cfg.DEVICE)
    output = settings = None
    per_trial, runs, checkpoints = [], [], []
    for trial, run_cfg, path in zip(trials, run_cfgs, ckpt_paths):
        split = build_test_split(run_cfg, trial=trial)  # dataset errors before the model loads
        model, meta = load_model_checked(path, run_cfg, device)
        if output is None:
            settings = protocol_settings(cfg, model)
            output = args.output or default_output_path(cfg, dataset_cls, type(model).default_embedding, ckpt_paths,
                                                         trials)
            out_stem = os.path.splitext(output)[0]
        qfeats, gfeats, used, gtrials, result, timing = run_split(model, split, run_cfg, device, path,
                                                                 all_sets=bool(args.save_features))
        del model
        distmat = result.pop("distmat")
        if trial is not None:
            meta["trial"] = trial
            for r in result["per_trial"]:
                r["trial"] = trial
        checkpoints.append(meta)
        per_trial += result["per_trial"]
        runs.append({"trial": trial, "protocol": split.protocol, "info": split.info, "num_query": len(split.query),
                     "num_gallery_images": int(len(used)),
                     "gallery_sizes": [int(len(t)) for t in gtrials], "timing": timing})
        tag = "" if trial is None else "trial%d" % trial
        if args.save_features:
            save_features(os.path.join(args.save_features, tag), split, qfeats, gfeats, used, gtrials,
                          settings)
        if args.visrank:
            for p in visualize(args, run_cfg, split, used, gtrials, distmat,
                               out_stem + ("_" + tag if tag else "")):
                print("wrote %s" % p)
        print("%s%d queries, %d gallery images (%d per trial), extraction %.1f s, metric %.2f s" % (
            "RegDB trial %d: " % trial if trial is not None else "", len(split.query), len(used),
            len(gtrials[0]), timing["extract_s"], timing["metric_s"]))

    mean, std = aggregate(per_trial)
    summary = {"per_trial": per_trial, "mean": mean, "std": std}
    from evaluation.trials import format_table

    title = "%s%s %s (%s, %s)" % (settings["method_label"] + ": " if settings.get("method_label") else "",
                                  cfg.DATASET.NAME, " ".join(dataset_cls.result_tags(cfg)), settings["feature"],
                                  "flip " + cfg.TEST.FLIP_MODE if cfg.TEST.FLIP else "no flip")
    print(format_table(dict(summary, num_trials=len(per_trial)), title, verbose=args.verbose))

    record = {
        "settings": settings,
        "list_trials": [t for t in trials if t is not None],
        "checkpoints": checkpoints,
        "runs": runs,
        "per_trial": per_trial,
        "mean": mean,
        "std": std,
        "command": [os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    save_json(output, record)
    print("wrote %s" % output)
    if args.plot_cmc:
        from evaluation.plots import plot_cmc

        plot_cmc([(settings["feature"], mean["cmc"], std["cmc"] if len(per_trial) > 1 else None)],
                 out_stem + "_cmc.png", title=title)
        print("wrote %s" % (out_stem + "_cmc.png"))
    return record


def cli(argv=None):
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(cli))
