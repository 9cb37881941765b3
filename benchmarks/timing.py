"""Timing helpers shared by the model benchmarks: device synchronisation and the mean time of
repeated calls after untimed warm-up calls."""
import time

import torch


def sync(device):
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters, warmup, device):
    """(mean seconds per call, the timed calls' results) of `fn` over `iters` calls after
    `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    results = [fn() for _ in range(iters)]
    sync(device)
    return (time.perf_counter() - start) / iters, results
