"""Preprocess SYSU-MM01 for training: four .npy arrays in the dataset root.

    python pre_process_sysu.py [--root DIR] [--size W H] [--filter lanczos|bilinear] [--workers N] [--force]

Released semantics (train + val ids, ascending-id labels, RGB cams 1,2,4,5 / IR cams 3,6,
LANCZOS resize to W x H, default 192 x 384 for CMFN; IV-REID trains at 128 x 384 with
--filter bilinear, kept in arrays of their own); see data/datasets/sysu.py. A rerun with
up-to-date arrays does nothing.
"""
import argparse
import json
import sys

from utils.errors import run_cli
from data.image_io import RESAMPLE
from data.datasets.sysu import DEFAULT_SIZE, preprocess_sysu
from utils.config import build_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="dataset root (default: DATASET.ROOT of configs/sysu.yaml)")
    parser.add_argument("--size", nargs=2, type=int, default=list(DEFAULT_SIZE), metavar=("W", "H"),
                        help="output width and height (default %d %d)" % DEFAULT_SIZE)
    parser.add_argument("--filter", choices=sorted(RESAMPLE), default="lanczos",
                        help="resize filter (INPUT.RESIZE_FILTER; default lanczos)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: all CPUs)")
    parser.add_argument("--force", action="store_true", help="rewrite the arrays even when up to date")
    args = parser.parse_args(argv)
    root = args.root or build_config("sysu", validate=False).DATASET.ROOT
    summary = preprocess_sysu(root, tuple(args.size), workers=args.workers, force=args.force, resample=args.filter)
    if summary["skipped"]:
        print("up to date: %s (%d RGB / %d IR images, %d ids, %dx%d)" % (
            root, summary["num_rgb"], summary["num_ir"], summary["num_ids"], *summary["size"]))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
