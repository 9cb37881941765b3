"""Test-time speed: feature extraction images/s (fp32 vs bf16) and the SYSU all-search metric.

Prints one JSON object:

* ``extraction``: images/s of evaluation.embeddings.extract_features (DataLoader, flip TTA as
  configured, all 6 feature sets) on in-memory random images, so disk decoding is excluded.
  fp32 is the baseline for bf16 (TEST.AMP) in the same run.
* ``metric``: the SYSU all-search 10-trial evaluation at full size on synthetic features:
  3,803 queries, 96 identities x 4 RGB cameras of gallery candidates (about 6,800 images),
  10 seeded single-shot trials of one image per (id, camera), 6 x 2048-d features. Timed:
  this project's path (one sum6 matmul over the gallery images any trial uses, then
  evaluation.trials.evaluate_trials on column subsets) against the released path measured
  on trial 0 here (6 matmuls per trial on that trial's gallery + the loop reference metric of
  tests/reference_eval.py), reported per trial and x10.

    python benchmarks/bench_test.py                       # CPU defaults (ResNet-50, 384x192)
    python benchmarks/bench_test.py --device cuda --batch 64 --batches 10
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.config import build_config  # noqa: E402
from evaluation.embeddings import distance_from_features, extract_features, used_gallery_columns  # noqa: E402
from model.cmfn.cmfn import CMFN  # noqa: E402


class RandomImages(Dataset):
    """`n` fixed random normalised images [3, H, W] with their index."""

    def __init__(self, n, height, width):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, height, width, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def bench_extraction(args, device):
    from model import build_model

    cfg = build_config("sysu", opts=[
        "MODEL.BACKBONE", args.backbone, "MODEL.PRETRAINED", "False",
        "INPUT.SIZE_TEST", str([args.height, args.width]),
        "TEST.BATCH_SIZE", str(args.batch), "TEST.NUM_WORKERS", "0",
        "TEST.FLIP", str(not args.no_flip),
    ])
    model = build_model(cfg, num_classes=395).to(device).eval()
    data = RandomImages(args.batch * args.batches, args.height, args.width)
    warm = RandomImages(args.batch, args.height, args.width)
    out = {"backbone": args.backbone, "size": [args.height, args.width], "batch": args.batch,
           "images": len(data), "flip": not args.no_flip}
    for amp in ("none", "bf16"):
        extract_features(model, warm, cfg, "infrared", device, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        extract_features(model, data, cfg, "infrared", device, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out["fp32" if amp == "none" else "bf16"] = {"seconds": round(dt, 3), "images_per_s": round(len(data) / dt, 2)}
    out["bf16_speedup"] = round(out["fp32"]["seconds"] / out["bf16"]["seconds"], 2)
    return out


class _Images:
    def __init__(self, pids, camids):
        self.pids, self.camids = np.asarray(pids), np.asarray(camids)
        self.paths = ["img%d" % i for i in range(len(self.pids))]

    def __len__(self):
        return len(self.pids)


class _Split:
    pass


def sysu_like_split(rng, num_ids=96, num_query=3803, rgb_cams=(1, 2, 4, 5), ir_cams=(3, 6), trials=10):
    """A SYSU-sized all-search split: queries, gallery candidates, seeded single-shot trials."""
    g_pids, g_cams, groups = [], [], []
    for pid in range(num_ids):
        for cam in rgb_cams:
            if (pid + cam) % 5 == 0:  # not every identity appears in every camera (301 of 384 on SYSU)
                continue
            n = int(rng.integers(8, 30))
            groups.append(list(range(len(g_pids), len(g_pids) + n)))
            g_pids += [pid] * n
            g_cams += [cam] * n
    q_pids = rng.integers(0, num_ids, num_query)
    q_cams = rng.choice(ir_cams, num_query)
    split = _Split()
    split.query, split.gallery = _Images(q_pids, q_cams), _Images(g_pids, g_cams)
    split.trials = []
    for t in range(trials):
        random.seed(t)
        split.trials.append(np.array([random.choice(grp) for grp in groups], dtype=np.int64))
    split.protocol = "sysu"
    return split


def synthetic_features(rng, pids, centres, noise):
    out = {}
    for name, c in centres.items():
        f = c[pids] + noise * torch.from_numpy(rng.standard_normal((len(pids), c.shape[1])).astype(np.float32))
        out[name] = torch.nn.functional.normalize(f, dim=1)
    return out


def bench_metric(args):
    from evaluation.trials import evaluate_trials

    rng = np.random.default_rng(0)
    split = sysu_like_split(rng)
    used, trials = used_gallery_columns(split)
    names = CMFN.embedding_sets
    centres = {n: torch.from_numpy(rng.standard_normal((96, args.dim)).astype(np.float32)) for n in names}
    qf = synthetic_features(rng, split.query.pids, centres, args.noise)
    gf = synthetic_features(rng, split.gallery.pids[used], centres, args.noise)
    gp, gc = split.gallery.pids[used], split.gallery.camids[used]

    t0 = time.perf_counter()
    distmat = distance_from_features(qf, gf, CMFN.embedding_weights("sum6"), "cosine")
    t1 = time.perf_counter()
    result = evaluate_trials(distmat, split.query.pids, gp, split.query.camids, gc, trials, "sysu")
    t2 = time.perf_counter()
    out = {
        "num_query": len(split.query), "gallery_candidates": len(split.gallery),
        "gallery_images_used": int(len(used)), "gallery_per_trial": int(len(trials[0])),
        "trials": len(trials), "feature_dim": 6 * args.dim,
        "ours": {"distance_s": round(t1 - t0, 3), "evaluate_trials_s": round(t2 - t1, 3),
                 "total_s": round(t2 - t0, 3), "rank1": round(result["mean"]["rank1"], 4),
                 "mAP": round(result["mean"]["mAP"], 4)},
    }
    if args.skip_reference:
        return out
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference_eval import eval_sysu

    cols = trials[0]
    t0 = time.perf_counter()
    sim = sum(qf[n] @ gf[n][cols].T for n in names)
    t1 = time.perf_counter()
    cmc, mAP, _ = eval_sysu(-sim.numpy(), split.query.pids, gp[cols], split.query.camids, gc[cols])
    t2 = time.perf_counter()
    out["released_trial0"] = {"distance_s": round(t1 - t0, 3), "metric_s": round(t2 - t1, 3),
                              "rank1": round(float(cmc[0]), 4), "mAP": round(float(mAP), 4)}
    out["released_x10_s"] = round(10 * (t2 - t0), 2)
    out["ours_trial0"] = {"rank1": round(result["per_trial"][0]["rank1"], 4),
                          "mAP": round(result["per_trial"][0]["mAP"], 4)}
    out["speedup_vs_released_x10"] = round(out["released_x10_s"] / out["ours"]["total_s"], 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet18"))
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--dim", type=int, default=2048, help="width of each of the 6 feature sets")
    parser.add_argument("--noise", type=float, default=6.5,
                        help="per-dimension noise around the identity centres (6.5: Rank-1 about 0.7 at dim 2048)")
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_extraction:
        report["extraction"] = bench_extraction(args, device)
    report["metric"] = bench_metric(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
