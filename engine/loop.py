"""One training epoch: batches to the device, forward, criterion, backward, step.

:func:`train_one_epoch` runs the iterations of ``progress.epoch`` from ``progress.iteration``
on. A resumed epoch first replays (loads and drops) the batches the interrupted run already
trained on, so the loader continues exactly where it stopped whatever its workers' state,
then restores the RNG state saved after the last finished step. Each step: the schedule sets
the learning rates of (epoch, iteration); the model gets ``(images, modality, camids)`` of the
batch dict under autocast; the criterion gets ``(outputs, batch, epoch)`` and returns
``(total, terms, info)``; a non-finite term on any process stops the run
(:class:`engine.training.NonFiniteError`); a stop request (signal) on any process ends the
epoch after the current step. Terms are logged every ``SOLVER.LOG_PERIOD`` iterations.
"""
import math
import sys
import time

import torch
from tqdm import tqdm

from engine.distributed import any_across_ranks, mean_across_ranks, parameters_in_sync
from engine.training import NonFiniteError, check_finite_loss, restore_rng_state


def to_device(batch, device, memory_format=torch.contiguous_format):
    """The batch dict on `device`; the images in `memory_format`."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "images"}
    out["images"] = batch["images"].to(device, non_blocking=True, memory_format=memory_format)
    return out


def format_terms(terms, digits=4):
    """'name value ...' of the loss terms other than the total, for the log."""
    return " ".join("%s %.*f" % (k, digits, v) for k, v in terms.items() if k != "total")


def train_one_epoch(train_model, loader, criterion, optimizer, scheduler, amp, cfg, ctx, progress, stop, logger,
                    tb, rng_after_skip=None, check_sync=False):
    """One epoch from iteration progress.iteration on; returns (mean loss terms, images/s, stopped)."""
    epoch = progress.epoch
    memory_format = torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format
    total_iters = len(loader)
    batch_iter = iter(loader)
    if progress.iteration:
        logger.info("resuming epoch %d at iteration %d: replaying %d batches of data", epoch, progress.iteration,
                    progress.iteration)
        for _ in range(progress.iteration):
            next(batch_iter)
    if rng_after_skip is not None:
        restore_rng_state(rng_after_skip)
    train_model.train()
    sums, count, images = {}, 0, 0
    # A bar on an interactive terminal only: redirected to a file it would be a wall of
    # carriage returns; the LOG_PERIOD lines carry the same numbers there.
    bar = tqdm(total=total_iters, initial=progress.iteration, desc="epoch %d" % epoch, file=sys.stderr,
               disable=not (ctx.is_main and sys.stderr.isatty()), leave=False, dynamic_ncols=True, mininterval=1.0)
    start = window_start = time.perf_counter()
    window_images = 0
    for iteration in range(progress.iteration, total_iters):
        batch = to_device(next(batch_iter), ctx.device, memory_format)
        scheduler.step(epoch, iteration, total_iters)
        lr = optimizer.param_groups[0]["lr"]
        with amp.autocast():
            outputs = train_model(batch["images"], batch["modality"], batch["camids"])
        loss, terms, info = criterion(outputs, batch, epoch)
        local_bad = not all(math.isfinite(v) for v in terms.values())
        stop_now, any_bad = any_across_ranks(ctx, [stop.requested, local_bad])
        if any_bad:
            check_finite_loss(terms, epoch, iteration, progress.global_step, progress.last_saved)
            raise NonFiniteError("non-finite loss on another process at epoch %d, iteration %d (global step %d). "
                                 "Last good checkpoint: %s" % (epoch, iteration, progress.global_step,
                                                               progress.last_saved or "none written yet"))
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        if check_sync and not parameters_in_sync(train_model, ctx):
            raise RuntimeError("--check-sync: parameters differ across processes after global step %d"
                               % progress.global_step)
        progress.iteration = iteration + 1
        progress.global_step += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        batch_images = batch["images"].shape[0] * ctx.world_size
        images += batch_images
        window_images += batch_images
        bar.update(1)
        if bar.n % 10 == 0 or iteration + 1 == total_iters:
            bar.set_postfix_str("loss %.3f (%s) lr %.2e %.1f img/s" % (
                terms["total"], format_terms(terms, 3), lr, images / max(time.perf_counter() - start, 1e-9)),
                refresh=False)
        if (iteration + 1) % cfg.SOLVER.LOG_PERIOD == 0 or iteration + 1 == total_iters:
            now = time.perf_counter()
            logger.info("epoch %d [%d/%d] loss %.4f (%s) lr %.2e %.1f img/s", epoch, iteration + 1, total_iters,
                        terms["total"], format_terms(terms), lr, window_images / max(now - window_start, 1e-9))
            tb.add_scalars("train", {"loss_" + k: v for k, v in terms.items()}, progress.global_step)
            if info:
                tb.add_scalars("train", dict(info), progress.global_step)
            window_start, window_images = now, 0
        if stop_now:
            break
    bar.close()
    return epoch_result(ctx, sums, count, images, start, progress, total_iters)


def epoch_result(ctx, sums, count, images, start, progress, total_iters):
    """(mean loss terms over the `count` steps, averaged across ranks; images/s since the
    perf_counter time `start`; whether the epoch stopped before its `total_iters`)."""
    seconds = time.perf_counter() - start
    means = mean_across_ranks(ctx, {k: v / count for k, v in sums.items()}) if count else {}
    return means, images / max(seconds, 1e-9), progress.iteration < total_iters
