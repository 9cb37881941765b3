"""Draw ranked galleries (and optionally the CMC curve) of a test run.

From features saved by ``test.py --save-features DIR`` (no model needed)::

    python tools/visualize_ranks.py --features DIR -k 10 --queries 8 --out DIR/ranks
    python tools/visualize_ranks.py --features DIR --queries 0,17,250 --feature mix --plot-cmc

From a checkpoint (runs test.py with --visrank K, which extracts the features first)::

    python tools/visualize_ranks.py --resume runs/sysu/best.pth -k 10 --dataset sysu

Each PNG page holds up to 8 queries, one per row: the query (blue frame) on the left, then its
top-K gallery images after the protocol's removal rule, framed green for the query's identity
and red otherwise, each labelled with rank, identity, modality and camera (evaluation/plots.py).
"""
import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from evaluation.embeddings import distance_from_features, load_features  # noqa: E402
from evaluation.plots import parse_queries, plot_cmc, save_rank_grids  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def embedding_of(settings, feature=None):
    """(preset name, [(set, weight)]) to rank by: the embedding the features were tested with,
    or the preset `feature` of the same model class."""
    embedding = settings.get("embedding")
    if not embedding:
        raise SystemExit("error: the folder records no embedding (settings['embedding']); "
                         "write it again with test.py --save-features")
    if feature is None or feature == embedding["preset"]:
        return embedding["preset"], [(name, float(w)) for name, w in embedding["weights"]]
    from model.registry import MODELS

    classes = [cls for _, cls in MODELS.items() if cls.__name__ == embedding["model"]]
    if not classes:
        raise SystemExit("error: the features come from model class %s, which is not registered"
                         % embedding["model"])
    try:
        return feature, classes[0].embedding_weights(feature)
    except ValueError as exc:
        raise SystemExit("error: --feature: %s" % exc) from None


def from_features(args):
    saved = load_features(args.features)
    meta = saved["split"]
    settings = meta.get("settings", {})
    feature, weights = embedding_of(settings, args.feature)
    metric = args.distance or settings.get("distance", "cosine")
    if not 0 <= args.trial_index < len(saved["trials"]):
        raise SystemExit("error: --trial-index %d out of range (the folder has %d trials)"
                         % (args.trial_index, len(saved["trials"])))
    distmat = distance_from_features(saved["query"], saved["gallery"], weights, metric).numpy()
    cols = saved["trials"][args.trial_index]
    out = args.out or os.path.join(args.features, "ranks")
    size = settings.get("image_size", [128, 64])
    written = save_rank_grids(
        distmat[:, cols],
        {"paths": meta["query_paths"], "pids": saved["query_pids"], "camids": saved["query_camids"],
         "modality": meta["query_modality"]},
        {"paths": [meta["gallery_paths"][i] for i in cols], "pids": saved["gallery_pids"][cols],
         "camids": saved["gallery_camids"][cols], "modality": meta["gallery_modality"]},
        meta["protocol"], out, k=args.topk, queries=parse_queries(args.queries),
        image_size=(64, max(1, round(64 * size[0] / size[1]))), prefix="ranks_%s" % feature,
    )
    if args.plot_cmc:
        from evaluation.trials import evaluate_trials

        result = evaluate_trials(distmat, saved["query_pids"], saved["gallery_pids"], saved["query_camids"],
                                 saved["gallery_camids"], saved["trials"], meta["protocol"])
        path = os.path.join(out, "cmc_%s.png" % feature)
        std = result["std"]["cmc"] if len(saved["trials"]) > 1 else None
        plot_cmc([(feature, result["mean"]["cmc"], std)], path,
                 title="%s %s" % (meta["protocol"], meta["info"].get("direction", "")))
        written.append(path)
    return written


def from_checkpoint(args, rest):
    spec = importlib.util.spec_from_file_location("cmfn_test_script", os.path.join(ROOT, "test.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--resume", args.resume, "--visrank", str(args.topk), "--queries", str(args.queries)]
    if args.plot_cmc:
        argv.append("--plot-cmc")
    if args.out:
        argv += ["--output", os.path.join(args.out, "test.json")]
    script.main(argv + rest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="DIR", help="folder written by test.py --save-features")
    source.add_argument("--resume", help="checkpoint: run test.py --visrank on it (other args go to test.py)")
    parser.add_argument("-k", "--topk", type=int, default=10, help="gallery images per query")
    parser.add_argument("--queries", default="8", help="a count (spread over the queries) or indices 3,17,42")
    parser.add_argument("--trial-index", type=int, default=0, help="which gallery trial (0-based)")
    parser.add_argument("--feature", help="an embedding preset of the model (default: the one the features "
                        "were tested with)")
    parser.add_argument("--distance", choices=("cosine", "euclidean"))
    parser.add_argument("--plot-cmc", action="store_true", help="also write the CMC curve")
    parser.add_argument("--out", help="output folder (default DIR/ranks, or test.py's location)")
    args, rest = parser.parse_known_args(argv)
    if args.features:
        if rest:
            parser.error("unrecognized arguments: %s" % " ".join(rest))
        for path in from_features(args):
            print("wrote %s" % path)
    else:
        from_checkpoint(args, rest)


if __name__ == "__main__":
    sys.exit(run_cli(main))
