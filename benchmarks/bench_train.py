"""Training throughput (images/s) of the SYSU recipe: full steps, data loading included.

A synthetic SYSU-MM01-layout dataset (``data/synthetic.py``) is written to a temporary folder
(or ``--data-root``, reused when it already holds one) and preprocessed to the training size.
Each mode then builds the real training DataLoader, CMFN, criterion, optimizer and mixed-
precision policy of train.py and times ``--iters`` steps after ``--warmup`` untimed ones::

    next batch -> to device -> autocast forward -> loss -> scaled backward -> optimizer step

Modes: ``fp32`` (the released setting, the baseline of the same run), ``bf16_cl`` (bf16
autocast + channels_last), and on CUDA also ``fp16_cl`` (fp16 autocast + GradScaler +
channels_last). Default setting: resnet50 CMFN at 384x192, P=6 x K=4 (24 visible + 24
infrared images per step), as released; ``--small`` uses resnet18 at 128x64 (quick look).

Prints one JSON object: the settings, per mode {images_per_s, step_s (mean, min), data_s
(mean time waiting for the loader), final loss, speedup_vs_fp32}, and the machine.

    python benchmarks/bench_train.py                    # CPU or the first GPU
    python benchmarks/bench_train.py --small --iters 5
    python benchmarks/bench_train.py --ids 2 2          # 4+4 images: fits a 24 GB CPU host

Host memory on CPU: one fp32 step at 384x192 with 4+4 images peaks at about 7 GB (CMFN
triples the batch after layer3 and keeps layer4 at stride 1), so the released 24+24 batch
needs roughly 40 GB; ``--ids 2 2`` measures the same per-image work on a small machine.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.config import build_config  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.training import MixedPrecision, seed_everything  # noqa: E402

MODES = {
    "fp32": ("none", False),
    "bf16_cl": ("bf16", True),
    "fp16_cl": ("fp16", True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="resnet18 at 128x64 instead of resnet50 at 384x192")
    p.add_argument("--backbone", help="override the backbone (resnet50, resnet18)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="override the training image size")
    p.add_argument("--ids", type=int, nargs=2, default=(6, 4), metavar=("P", "K"), help="identities x images per batch")
    p.add_argument("--iters", type=int, default=None, help="timed steps per mode (default 2 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--modes", default=None, help="comma-separated subset of %s (default: fp32,bf16_cl and, on "
                                                 "CUDA, fp16_cl)" % ",".join(MODES))
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cfg, capped by CPUs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-root", help="dataset folder to create or reuse (default: a temporary folder)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def prepare_data(root, size_hw):
    """A synthetic SYSU-layout dataset with training arrays at `size_hw` (reused if present)."""
    from data.synthetic import write_sysu
    from data.datasets.sysu import preprocess_sysu

    if not os.path.isfile(os.path.join(root, "exp", "train_id.txt")):
        write_sysu(root, num_train=24, num_val=6, num_test=4, seed=0, images_per_cam=6, workers=os.cpu_count())
    preprocess_sysu(root, (size_hw[1], size_hw[0]), workers=os.cpu_count(), progress=False)


def bench_mode(cfg, device, amp_mode, channels_last, warmup, iters):
    from data import build_train_loader
    from engine.loop import to_device
    from loss import build_criterion
    from model import build_model
    from engine.solver import build_optimizer, build_scheduler

    seed_everything(cfg.SEED)
    loader, sampler, train_set = build_train_loader(cfg)
    sampler.set_epoch(0)
    model = build_model(cfg, train_set.num_classes).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(cfg, model)
    build_scheduler(cfg, optimizer, len(loader)).step(10)
    amp = MixedPrecision(amp_mode, device.type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = iter(loader)
    step_times, data_times, images, loss = [], [], 0, None
    for step in range(warmup + iters):
        sync()
        start = time.perf_counter()
        batch = to_device(next(batches), device, memory_format)
        data_s = time.perf_counter() - start
        with amp.autocast():
            outputs = model(batch["images"], batch["modality"], batch["camids"])
        total, terms, _ = criterion(outputs, batch, 10)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(total).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        sync()
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            data_times.append(data_s)
            images += batch["images"].shape[0]
            loss = terms["total"]
    seconds = sum(step_times)
    return {
        "images_per_s": images / seconds,
        "step_s_mean": seconds / len(step_times),
        "step_s_min": min(step_times),
        "data_s_mean": sum(data_times) / len(data_times),
        "final_loss": loss,
        "peak_cuda_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
    }


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = args.backbone or ("resnet18" if args.small else "resnet50")
    size = list(args.size) if args.size else ([128, 64] if args.small else [384, 192])
    iters = args.iters or (20 if on_cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    modes = args.modes.split(",") if args.modes else (["fp32", "bf16_cl"] + (["fp16_cl"] if on_cuda else []))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit("unknown mode(s) %s; choose from %s" % (", ".join(unknown), ", ".join(MODES)))
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = args.data_root or os.path.join(tmp, "SYSU-MM01")
        start = time.perf_counter()
        prepare_data(root, size)
        data_prep_s = time.perf_counter() - start
        results = {}
        for mode in modes:
            amp_mode, channels_last = MODES[mode]
            cfg = build_config("sysu", opts=[
                "DATASET.ROOT", root, "MODEL.BACKBONE", backbone, "MODEL.PRETRAINED", "False",
                "INPUT.SIZE_TRAIN", str(size), "INPUT.SIZE_TEST", str(size),
                "DATALOADER.NUM_IDS", str(args.ids[0]), "DATALOADER.NUM_POS", str(args.ids[1]),
                "DATALOADER.NUM_WORKERS", str(workers), "SOLVER.ITERS_PER_EPOCH", str(warmup + iters),
                "DEVICE", str(device),
            ])
            results[mode] = bench_mode(cfg, device, amp_mode, channels_last, warmup, iters)
            print("%s: %.2f images/s" % (mode, results[mode]["images_per_s"]), file=sys.stderr)
    if "fp32" in results:
        for r in results.values():
            r["speedup_vs_fp32"] = r["images_per_s"] / results["fp32"]["images_per_s"]
    report = {
        "benchmark": "train_step_throughput",
        "setting": {"model": "cmfn", "backbone": backbone, "size_hw": size, "P": args.ids[0], "K": args.ids[1],
                    "images_per_step": 2 * args.ids[0] * args.ids[1], "warmup": warmup, "iters": iters,
                    "workers": workers, "device": str(device), "threads": torch.get_num_threads()},
        "results": results,
        "data_prep_s": data_prep_s,
        "machine": {"python": platform.python_version(), "torch": str(torch.__version__),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
                    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from utils.io import save_text

        save_text(args.out, text + "\n")
    return report


if __name__ == "__main__":
    main()
