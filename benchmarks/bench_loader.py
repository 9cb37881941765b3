"""Training-loader throughput per layout and SYSU preprocessing speed, on synthetic data.

    python benchmarks/bench_loader.py [--layouts sysu regdb llcm] [--workers 0 1 2] [--batches 20]

For each layout a synthetic dataset is generated in a temporary folder, then the training
DataLoader of that layout's config (released sizes and augmentations: 384x192 with
ColorJitter for SYSU, 384x144 without for RegDB/LLCM; P=6, K=4) is timed for each worker
count: images per second (visible + infrared) over ``--batches`` batches after one warm-up
batch, and the first-batch latency (worker start-up included). ``pre_process_sysu`` at
192x384 is timed against a single-process PIL loop (the released script's way) on the same
files in the same run. Prints one JSON object.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.image_io import default_workers  # noqa: E402
from data.loader import build_train_loader  # noqa: E402
from data.synthetic import write_llcm, write_regdb, write_sysu  # noqa: E402
from data.datasets.sysu import DEFAULT_SIZE, preprocess_sysu, training_listing  # noqa: E402
from utils.config import build_config  # noqa: E402


def _generate(layout, root, ids):
    if layout == "sysu":
        write_sysu(root, ids - ids // 2 - 2, 2, ids // 2, seed=0, images_per_cam=12, workers=default_workers())
    elif layout == "regdb":
        write_regdb(root, ids, seed=0, images_per_id=10, workers=default_workers())
    else:
        write_llcm(root, ids // 2, ids - ids // 2, seed=0, images_per_cam=6, workers=default_workers())


def _time_loader(cfg, batches):
    loader, sampler, train_set = build_train_loader(cfg)
    sampler.set_epoch(0)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["images"].shape[0]
    elapsed = time.perf_counter() - start
    del it, loader
    return {"images_per_s": round(n / elapsed, 1), "first_batch_s": round(first, 3), "images": n,
            "train_images": int(len(train_set))}


def _baseline_preprocess(root, size):
    """The released single-process loop: open, LANCZOS resize, np.array, stack."""
    listing = training_listing(root)
    out = {}
    for mod in ("rgb", "ir"):
        imgs = [np.array(Image.open(os.path.join(root, rel)).resize(size, Image.LANCZOS)) for rel in listing[mod][0]]
        out[mod] = np.array(imgs)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["sysu", "regdb", "llcm"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--ids", type=int, default=40, help="identities per synthetic dataset")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the main process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "cpus": default_workers(), "batches": args.batches, "loader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            root = os.path.join(tmp, layout)
            start = time.perf_counter()
            _generate(layout, root, args.ids)
            gen_s = time.perf_counter() - start
            if layout == "sysu":
                baseline_start = time.perf_counter()
                ref = _baseline_preprocess(root, DEFAULT_SIZE)
                baseline = time.perf_counter() - baseline_start
                summary = preprocess_sysu(root, DEFAULT_SIZE, progress=False)
                rerun = preprocess_sysu(root, DEFAULT_SIZE, progress=False)
                same = all(np.array_equal(ref[m], np.load(os.path.join(root, "train_%s_resized_img.npy" % m)))
                           for m in ("rgb", "ir"))
                result["pre_process_sysu"] = {
                    "size_wh": list(DEFAULT_SIZE), "images": summary["num_rgb"] + summary["num_ir"],
                    "baseline_single_process_pil_s": round(baseline, 3), "parallel_s": round(summary["seconds"], 3),
                    "speedup": round(baseline / summary["seconds"], 2), "identical_arrays": bool(same),
                    "rerun_up_to_date_s": round(rerun["seconds"], 3), "rerun_skipped": rerun["skipped"],
                    "decode_threads": default_workers(),
                }
            per_workers = {}
            for workers in args.workers:
                cfg = build_config(layout, opts=["DATASET.ROOT", root, "DATALOADER.NUM_WORKERS", str(workers),
                                                 "SOLVER.ITERS_PER_EPOCH", str(args.batches + 1)])
                per_workers[str(workers)] = _time_loader(cfg, args.batches)
            result["loader"][layout] = {"size_hw": list(build_config(layout).INPUT.SIZE_TRAIN),
                                        "color_jitter": list(build_config(layout).INPUT.COLOR_JITTER),
                                        "generation_s": round(gen_s, 2), "workers": per_workers}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
