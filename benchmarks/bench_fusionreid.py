"""FusionReID training throughput: the full step (forward, six-head criterion, backward, SGD
step) of the full-size model (ResNet-50 + ViT-B/16 stride 12, 2-layer HTM, Market-1501's 751
classes and 6 cameras) at the recipe's 256x128, per precision.

Prints one JSON object. Settings: ``cpu_fp32``; ``cpu_bf16`` (bf16 autocast, the CPU choice of
SOLVER.AMP auto); on a CUDA machine also ``cuda_fp32`` and ``cuda_fp16`` (autocast + GradScaler,
the released recipe). ``vs_fp32`` relates each setting to fp32 on the same device, measured in
the same run. The batch is P identities x K images (default 2 x 2; the recipe's 8 x 16 does not
fit a laptop), the model randomly initialised (no ImageNet file is read).

    python benchmarks/bench_fusionreid.py                    # batch 2 x 2, 2 timed steps
    python benchmarks/bench_fusionreid.py --ids 4 --instances 4 --iters 3 --json out.json
"""
import argparse
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.timing import timed  # noqa: E402
from engine.solver import build_optimizer  # noqa: E402
from engine.training import MixedPrecision  # noqa: E402
from loss import build_criterion  # noqa: E402
from model import build_model  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.io import save_json  # noqa: E402

NUM_CLASSES = 751


def bench_setting(cfg, device, amp_mode, args):
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(cfg, model)
    amp = MixedPrecision(amp_mode, device.type)
    n = args.ids * args.instances
    images = torch.randn(n, 3, *cfg.INPUT.SIZE_TRAIN, device=device)
    batch = {"pids": torch.arange(args.ids, device=device).repeat_interleave(args.instances),
             "camids": torch.arange(n, device=device) % int(cfg.MODEL.FUSIONREID.NUM_CAMERAS)}

    def step():
        with amp.autocast():
            outputs = model(images, None, batch["camids"])
        loss, _, _ = criterion(outputs, batch, 0)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        return float(loss.detach())

    seconds, losses = timed(step, args.iters, args.warmup, device)
    return {"s_per_step": round(seconds, 4), "images_per_s": round(n / seconds, 3),
            "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=2, help="P identities per batch")
    parser.add_argument("--instances", type=int, default=2, help="K images per identity")
    parser.add_argument("--iters", type=int, default=2, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setting")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size (default: the recipe's 256 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ["MODEL.PRETRAINED", "False"]
    if args.size:
        opts += ["INPUT.SIZE_TRAIN", str(args.size), "INPUT.SIZE_TEST", str(args.size)]
    cfg = build_config("market1501", method="fusionreid", opts=opts)
    settings = [("cpu_fp32", "cpu", "none"), ("cpu_bf16", "cpu", "bf16")]
    if torch.cuda.is_available():
        settings += [("cuda_fp32", "cuda", "none"), ("cuda_fp16", "cuda", "fp16")]
    results = {name: bench_setting(cfg, torch.device(dev), mode, args) for name, dev, mode in settings}
    for name, r in results.items():
        base = results[name.split("_")[0] + "_fp32"]
        r["vs_fp32"] = round(base["s_per_step"] / r["s_per_step"], 3)
    report = {"benchmark": "fusionreid_train_step", "input": list(cfg.INPUT.SIZE_TRAIN),
              "batch": {"ids": args.ids, "instances": args.instances}, "classes": NUM_CLASSES,
              "iters": args.iters, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
