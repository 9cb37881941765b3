"""Where a run stands, and the resumable checkpoint that records it.

:class:`Progress` counts the epoch, the iterations of that epoch already done, the global
step and the best selection value. :func:`make_state` turns the live objects (model,
optimizer, scheduler, GradScaler, RNG streams) into a checkpoint dict of tensors and plain
values (:mod:`engine.checkpoint`); :func:`restore_state` puts such a checkpoint back, so that
``--resume`` continues exactly, mid-epoch included: the RNG state saved after the last
finished step is returned to be applied once the loader has replayed the batches of the
interrupted epoch.
"""
import dataclasses
import os

import torch

from engine.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from engine.run_dir import BEST_CHECKPOINT, LAST_CHECKPOINT
from engine.training import capture_rng_state, restore_rng_state


@dataclasses.dataclass
class Progress:
    """Where the run stands; `iteration` = iterations of the current epoch already done."""
    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best_value: float = None
    best_epoch: int = None
    last_saved: str = None


def make_state(model, optimizer, scheduler, amp, cfg, num_classes, progress, completed_epoch, ctx):
    """A resumable checkpoint: `completed_epoch` finished, plus progress.iteration steps of the next."""
    return make_checkpoint(
        model.state_dict(), cfg, num_classes, completed_epoch,
        iteration=int(progress.iteration),
        global_step=int(progress.global_step),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=amp.scaler.state_dict(),
        rng=capture_rng_state(),
        best={"metric": cfg.SOLVER.BEST_METRIC, "select_by": cfg.SOLVER.SELECT_BY,
              "value": progress.best_value, "epoch": progress.best_epoch},
        meta={"world_size": ctx.world_size, "torch": str(torch.__version__)},
    )


def save_last(state, run_dir, progress, also_best=False):
    """Write last.pth (and best.pth); remember it as the last good checkpoint."""
    path = os.path.join(run_dir, LAST_CHECKPOINT)
    save_checkpoint(path, state)
    progress.last_saved = "%s (epoch %d%s)" % (
        path, state["epoch"], ", +%d iterations" % state["iteration"] if state["iteration"] else "")
    if also_best:
        save_checkpoint(os.path.join(run_dir, BEST_CHECKPOINT), state)


def restore_state(ckpt, model, optimizer, scheduler, amp, progress, ctx, logger, path):
    """Load a resumable checkpoint; returns the RNG state to apply after the skipped steps (or None)."""
    for key in ("optimizer", "scheduler", "rng"):
        if key not in ckpt:
            raise CheckpointError("%s has no %r entry: it holds weights only and cannot be resumed" % (path, key))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        amp.scaler.load_state_dict(ckpt["scaler"])
    best = ckpt.get("best") or {}
    progress.best_value, progress.best_epoch = best.get("value"), best.get("epoch")
    progress.epoch = int(ckpt["epoch"]) + 1
    progress.iteration = int(ckpt.get("iteration", 0))
    progress.global_step = int(ckpt.get("global_step", 0))
    progress.last_saved = "%s (epoch %d)" % (path, ckpt["epoch"])
    saved_ws = (ckpt.get("meta") or {}).get("world_size", 1)
    if progress.iteration and saved_ws != ctx.world_size:
        logger.warning("resuming mid-epoch with %d processes, the checkpoint was written by %d: the rest of "
                       "this epoch will not match an uninterrupted run", ctx.world_size, saved_ws)
    logger.info("resumed from %s: epoch %d done%s, global step %d", path, ckpt["epoch"],
                ", +%d iterations of epoch %d" % (progress.iteration, progress.epoch) if progress.iteration else "",
                progress.global_step)
    if progress.iteration:
        return ckpt["rng"]
    restore_rng_state(ckpt["rng"])
    return None
