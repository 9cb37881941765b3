"""Model throughput: training step (forward + backward) and inference images/s, CMFN vs baseline.

Prints one JSON object. For each model (CMFN and, as the reference measured in the same run,
the baseline = the same two-stem ResNet without HCE/MFA/MBUE) and each precision setting:

* ``train``: train-mode forward + backward on ``--batch`` visible + ``--batch`` infrared images
  (recipe: 24 + 24), loss = cross-entropy on the logits + 0.01 loss_ort; images/s counts the
  2 x batch input images (the CMFN internally runs 3 copies after MBUE);
* ``infer``: eval-mode forward (no grad) of ``--eval-batch`` visible images.

Settings: ``cpu_fp32``; ``cpu_bf16_cl`` (bf16 autocast + channels_last model and inputs); on a
CUDA machine also ``cuda_fp32`` and ``cuda_amp_bf16_cl``. ``speedup_vs_fp32`` relates each
setting to fp32 on the same device; ``cmfn_vs_baseline`` the CMFN time to the baseline time.

    python benchmarks/bench_model.py --backbone resnet18 --size 128 64 --iters 3
    python benchmarks/bench_model.py --iters 1 --warmup 0        # ResNet-50 384x192, batch 24+24
"""
import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.timing import timed  # noqa: E402
from model import build_model  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.io import save_json  # noqa: E402

NUM_CLASSES = 395


def _autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def bench_one(model, device, bf16, channels_last, args):
    height, width = args.size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    gen = torch.Generator().manual_seed(0)

    def images(n):
        return torch.randn(n, 3, height, width, generator=gen).to(device=device, memory_format=memory_format)

    x_train = images(2 * args.batch)
    modality = torch.cat([torch.zeros(args.batch), torch.ones(args.batch)]).long().to(device)
    labels = torch.randint(0, NUM_CLASSES, (2 * args.batch,), generator=gen).to(device)
    x_eval = images(args.eval_batch)

    def train_step():
        with _autocast(device, bf16):
            out = model(x_train, modality)
            target = labels.repeat(out["logits"].shape[0] // labels.shape[0])
            loss = F.cross_entropy(out["logits"].float(), target) + 0.01 * out["ort"].float()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), _autocast(device, bf16):
            model(x_eval, modality="visible")

    result = {}
    if not args.skip_train:
        model.train()
        seconds, _ = timed(train_step, args.iters, args.warmup, device)
        result["train"] = {"s_per_iter": seconds, "images_per_s": 2 * args.batch / seconds}
    model.eval()
    seconds, _ = timed(infer_step, args.eval_iters or args.iters, args.warmup, device)
    result["infer"] = {"s_per_iter": seconds, "images_per_s": args.eval_batch / seconds}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result


def settings(devices):
    out = []
    for device in devices:
        out.append(("%s_fp32" % device.type, device, False, False))
        name = "cpu_bf16_cl" if device.type == "cpu" else "cuda_amp_bf16_cl"
        out.append((name, device, True, True))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet18"))
    parser.add_argument("--size", type=int, nargs=2, default=(384, 192), metavar=("H", "W"))
    parser.add_argument("--dataset", default="sysu", help="configuration (sysu/llcm: MBUE after layer3, regdb: layer2)")
    parser.add_argument("--batch", type=int, default=24, help="images per modality in a training step")
    parser.add_argument("--eval-batch", type=int, default=48, help="images per inference call")
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per measurement")
    parser.add_argument("--eval-iters", type=int, default=0, help="timed inference iterations (0 = --iters)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--models", default="cmfn,baseline")
    parser.add_argument("--settings", default="", help="comma-separated subset, e.g. cpu_fp32,cuda_fp32")
    parser.add_argument("--skip-train", action="store_true", help="inference only")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even if CUDA is available")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    chosen = settings(devices)
    if args.settings:
        wanted = set(args.settings.split(","))
        chosen = [s for s in chosen if s[0] in wanted]

    report = {
        "config": {
            "backbone": args.backbone, "size": list(args.size), "dataset": args.dataset,
            "train_batch": "%d visible + %d infrared" % (args.batch, args.batch),
            "eval_batch": args.eval_batch, "iters": args.iters, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "results": {},
    }
    for name in args.models.split(","):
        cfg = build_config(args.dataset, opts=[
            "MODEL.NAME", name, "MODEL.BACKBONE", args.backbone, "MODEL.PRETRAINED", "False",
        ])
        torch.manual_seed(0)
        model = build_model(cfg, NUM_CLASSES)
        per_model = {}
        for label, device, bf16, channels_last in chosen:
            per_model[label] = bench_one(model, device, bf16, channels_last, args)
            print("%s %s: %s" % (name, label, json.dumps(per_model[label])), file=sys.stderr, flush=True)
        for label, device, _, _ in chosen:
            base = per_model.get("%s_fp32" % device.type)
            if base and label != "%s_fp32" % device.type:
                per_model[label]["speedup_vs_fp32"] = {
                    part: base[part]["s_per_iter"] / per_model[label][part]["s_per_iter"]
                    for part in ("train", "infer") if part in per_model[label]
                }
        report["results"][name] = per_model
        del model
    if "cmfn" in report["results"] and "baseline" in report["results"]:
        report["cmfn_vs_baseline"] = {
            label: {
                part: report["results"]["cmfn"][label][part]["s_per_iter"]
                / report["results"]["baseline"][label][part]["s_per_iter"]
                for part in ("train", "infer") if part in report["results"]["cmfn"][label]
            }
            for label in report["results"]["cmfn"]
        }
    print(json.dumps(report, indent=2))
    if args.json:
        save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
