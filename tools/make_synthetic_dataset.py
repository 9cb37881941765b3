"""Write a small synthetic dataset in the exact on-disk layout of SYSU-MM01, RegDB, LLCM,
Market-1501, DukeMTMC-reID or MSMT17.

    python tools/make_synthetic_dataset.py --layout sysu|regdb|llcm|market|duke|msmt17 --root DIR
        [--ids N] [--seed S] [--images K] [--msmt17-version v1|v2]

Images are procedurally drawn people (data/synthetic.py): per identity a fixed body shape,
proportions, clothing pattern and colours; visible images in colour, infrared images
thermal-like; per camera its own background, scale, position and lighting. The same
arguments always produce the same files. For SYSU the training arrays are not written; run
pre_process_sysu.py --root DIR afterwards. Market, Duke and MSMT17 (data/synthetic_market.py)
split the ids half for training, half for testing; the Market gallery also gets
distractors (pid 0) and junk (pid -1), the Duke gallery distractor identities.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.image_io import default_workers  # noqa: E402
from data.synthetic import write_llcm, write_regdb, write_sysu  # noqa: E402
from data.synthetic_market import write_duke, write_market, write_msmt17  # noqa: E402
from utils.errors import run_cli  # noqa: E402

# Default identities per layout: SYSU 24 train + 6 val + 20 test, RegDB 20 (10/10 per
# trial), LLCM 20 train + 20 test, Market / Duke / MSMT17 10 train + 10 test.
DEFAULT_IDS = {"sysu": 50, "regdb": 20, "llcm": 40, "market": 20, "duke": 20, "msmt17": 20}
SINGLE_MODALITY = {"market": write_market, "duke": write_duke, "msmt17": write_msmt17}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", required=True, choices=sorted(DEFAULT_IDS))
    parser.add_argument("--root", required=True, help="output folder (must be absent or empty)")
    parser.add_argument("--ids", type=int, default=None,
                        help="identities in all (default: sysu 50, regdb 20, llcm 40, market/duke/msmt17 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None,
                        help="images per identity and camera (sysu default 6, llcm/market/duke/msmt17 3) or "
                             "per identity and modality (regdb default 10)")
    parser.add_argument("--msmt17-version", choices=("v1", "v2"), default="v1",
                        help="msmt17 folder names: v1 train/ test/, v2 mask_train_v2/ mask_test_v2/")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    args = parser.parse_args(argv)
    ids = args.ids or DEFAULT_IDS[args.layout]
    if os.path.isdir(args.root) and os.listdir(args.root):
        parser.error("%s is not empty" % args.root)
    workers = args.workers or default_workers()
    start = time.time()
    if args.layout == "sysu":
        if ids < 3:
            parser.error("--ids must be >= 3 for sysu (train, val and test)")
        test = max(1, (2 * ids) // 5)
        val = max(1, (ids - test) // 5)
        write_sysu(args.root, ids - test - val, val, test, args.seed, args.images or 6, workers)
    elif args.layout == "regdb":
        if ids < 2:
            parser.error("--ids must be >= 2 for regdb")
        write_regdb(args.root, ids, args.seed, args.images or 10, workers)
    elif args.layout == "llcm":
        if ids < 2:
            parser.error("--ids must be >= 2 for llcm")
        write_llcm(args.root, ids - ids // 2, ids // 2, args.seed, args.images or 3, workers)
    else:
        if ids < 2:
            parser.error("--ids must be >= 2 for %s" % args.layout)
        extra = {"version": args.msmt17_version} if args.layout == "msmt17" else {}
        SINGLE_MODALITY[args.layout](args.root, ids - ids // 2, ids // 2, args.seed, args.images or 3,
                                     workers=workers, **extra)
    print("wrote %s dataset (%d ids, seed %d) to %s in %.1f s" % (args.layout, ids, args.seed, args.root, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
