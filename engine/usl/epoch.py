"""The iterations of one epoch of an unsupervised stage.

**Data.** Per stage, one :class:`data.pseudo.PseudoLabelSet` per loader with the stage's
training views (:func:`stage_datasets`): stages 1 and 2 an RGB set (view 1 and view 2 of each
image) and an IR set (one view); a camera-local run one set over its camera's images (RGB runs
use view 1 only). Each epoch gets fresh loaders over the epoch's pseudo labels
(:func:`epoch_loaders`): USL.BATCH_SIZE IR images and half as many RGB images (so both give
USL.BATCH_SIZE rows), USL.NUM_INSTANCES per label, exactly ``stage.iters`` batches; their plans
and augmentations depend only on (SEED, stage, epoch, stream) and the labels. Stage 2's
camera slot holds the image index (USL.CAMERA_SLOT_STAGE2 index, released SYSU) or the camera.

**One iteration** (:func:`train_epoch`): the RGB rows and then the IR rows go through the
encoder as one batch (the released modal-0 forward: each row through its modality's stem),
``feat`` and ``tokens`` are split back by modality, and the stage's loss
(:mod:`loss.tokenmatcher`) gives ``(total, terms, info)``:

* ``stage1``: ``stage1_loss(memories["ir"], memories["rgb"], f_ir, f_rgb, ...)``;
* ``camera``: ``camera_local_loss(memories["camera"], f, ...)``;
* ``stage2``: the method's stage-2 step (:data:`STAGE2_STEPS`, by METHOD; TokenMatcher's is
  :class:`TokenMatcherStage2`), which may hold trainable modules and state of its own.

Then backward (the memories move their banks inside it), the optimiser step, and the step's
``after_step`` hook. Under DDP every process gathers the global batch's features, tokens, labels
and indexes in the single-process row order before the loss (an autograd all-gather), so every
process computes the same loss and updates identical memory banks; DDP's gradient average then
equals the single-process gradient.

A resumed epoch first replays (loads and drops) the batches already trained on, then restores
the RNG state saved after the last finished step, as :mod:`engine.loop` does. A non-finite
loss on any process raises :class:`engine.training.NonFiniteError`; a stop request ends the
epoch after the current step.
"""
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.errors import DatasetError
from data.pseudo import PseudoLabelSet, build_pseudo_loader
from data.samplers.multiple_gallery import camera_slot
from data.usl_transforms import build_train_views, params_from_config
from engine.distributed import any_across_ranks
from engine.loop import epoch_result, format_terms, to_device
from engine.training import NonFiniteError, check_finite_loss, restore_rng_state, seed_everything
from loss.tokenmatcher import Stage2Loss, camera_local_loss, stage1_loss
from model.base import VISIBLE
from utils.registry import Registry

STAGE2_STEPS = Registry("stage-2 step", "METHOD", modules=("engine.usl.cmag",))
STREAMS = {"rgb": 0, "ir": 1, "camera": 2}


def _seed(seed, stage_index, epoch, purpose, rank=0):
    state = np.random.SeedSequence([int(seed), int(stage_index), int(epoch) + 1, int(purpose), int(rank)])
    return int(state.generate_state(1)[0]) & 0x7FFFFFFF


def seed_labelling(seed, stage_index, epoch):
    """Reseed every global generator for an epoch's pseudo-labelling: the same on every process,
    so that the pruning draws agree."""
    seed_everything(_seed(seed, stage_index, epoch, 0))


def seed_iterations(seed, stage_index, epoch, rank):
    """Reseed every global generator for an epoch's iterations (stochastic depth, per process)."""
    seed_everything(_seed(seed, stage_index, epoch, 1, rank))


def sampler_seed(seed, stage_index):
    return _seed(seed, stage_index, 0, 2)


@STAGE2_STEPS.register("tokenmatcher")
class TokenMatcherStage2:
    """TokenMatcher's stage-2 step: :class:`loss.tokenmatcher.Stage2Loss` on the encoder's
    features. The interface a method's stage-2 step offers the engine (built once per run as
    ``step(cfg, model)``, `model` the unwrapped encoder):

    * ``describe()``: lines for the log saying what the step adds;
    * ``start(model)``: called when stage 2 starts (not when it resumes), with its starting weights;
    * ``param_groups()``: extra optimiser groups (dicts with ``params``, ``name``, ``lr_factor``);
    * ``__call__``: (total, terms, info) of one global batch;
    * ``after_step(model)``: after every optimiser step;
    * ``evaluation_model(model)``: the model that stage 2 evaluates and selects;
    * ``state_dict()`` / ``load_state_dict()``: its resumable state (tensors and plain values)."""

    def __init__(self, cfg, model):
        self.loss = Stage2Loss.from_config(cfg)

    def describe(self):
        return []

    def start(self, model):
        pass

    def param_groups(self):
        return []

    def __call__(self, epoch, labelled, f_ir, f_rgb, batch_ir, batch_rgb, tokens_ir, tokens_rgb):
        return self.loss(epoch, labelled.memories, labelled.match, f_ir, f_rgb, batch_ir["pids"], batch_rgb["pids"],
                         tokens_ir, tokens_rgb, **stage2_lookup(labelled, batch_ir, batch_rgb))

    def after_step(self, model):
        pass

    def evaluation_model(self, model):
        return model

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def stage2_lookup(labelled, batch_ir, batch_rgb):
    """The keyword arguments of the stage-2 loss that locate the batch rows: the neighbour lists
    and the rows' image indexes and cameras."""
    return dict(neighbours=labelled.neighbours, index_ir=batch_ir["index"], index_rgb=batch_rgb["index"],
                camid_ir=batch_ir["camids"], camid_rgb=batch_rgb["camids"])


def stage_datasets(stage, labeller):
    """key -> PseudoLabelSet of `stage` (module docstring), in the order of their rows in a batch."""
    views = build_train_views(params_from_config(labeller.cfg, stage.kind))
    if stage.kind == "camera":
        view = views["rgb"] if stage.modality == VISIBLE else views["ir"]
        return {"camera": PseudoLabelSet(labeller.camera_listing(stage), [view])}
    listings = labeller.listings
    return {"rgb": PseudoLabelSet(listings[0], [views["rgb"], views["rgb2"]]),
            "ir": PseudoLabelSet(listings[1], [views["ir"]])}


def epoch_loaders(stage, datasets, labelled, cfg, ctx, epoch):
    """[loader] of one epoch over `labelled`'s pseudo labels, in the datasets' order."""
    slot = "index" if stage.kind == "stage2" and cfg.USL.CAMERA_SLOT_STAGE2 == "index" else "camera"
    loaders = []
    for key, dataset in datasets.items():
        batch = cfg.USL.BATCH_SIZE // 2 if key == "rgb" else cfg.USL.BATCH_SIZE
        try:
            loader, _ = build_pseudo_loader(
                dataset, labelled.labels[key], camera_slot(dataset.listing.cams, slot), batch, cfg.USL.NUM_INSTANCES,
                stage.iters, seed=sampler_seed(cfg.SEED, stage.index), stream=STREAMS[key], epoch=epoch,
                order=cfg.USL.SAMPLER_ORDER, workers=cfg.DATALOADER.NUM_WORKERS, rank=ctx.rank,
                world_size=ctx.world_size, pin_memory=cfg.DATALOADER.PIN_MEMORY)
        except DatasetError as exc:
            raise DatasetError("%s epoch %d, %s loader: %s; too few clusters for USL.BATCH_SIZE %d with "
                               "USL.NUM_INSTANCES %d (or change the DBSCAN radius)"
                               % (stage.name, epoch, key, exc, cfg.USL.BATCH_SIZE, cfg.USL.NUM_INSTANCES)) from None
        loaders.append(loader)
    return loaders


def view_major(parts, views):
    """The rows of the processes' `parts` (each: its items in `views` blocks, view 1 first) in the
    single-process order: view 1 of every process's items in rank order, then view 2, ..."""
    blocks = [p.chunk(views) for p in parts]
    return torch.cat([blocks[r][v] for v in range(views) for r in range(len(parts))])


def _gather(ctx, tensor, views, differentiable=False):
    """The global batch's rows of `tensor` (this process's rows in `views` blocks), in the
    single-process order (:func:`view_major`); autograd flows back to this process's rows when
    `differentiable`."""
    if not ctx.distributed:
        return tensor
    if differentiable:
        import torch.distributed.nn.functional as dist_nn

        parts = dist_nn.all_gather(tensor.contiguous())
    else:
        parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(parts, tensor.contiguous())
    return view_major(parts, views)


def _split(ctx, outputs, batches, views):
    """Per loader: (features, tokens, batch dict) of the global batch."""
    out, start = [], 0
    for batch, v in zip(batches, views):
        rows = slice(start, start + len(batch["pids"]))
        start = rows.stop
        global_batch = {k: _gather(ctx, batch[k], v) for k in ("pids", "camids", "index")}
        out.append((_gather(ctx, outputs["feat"][rows], v, True), _gather(ctx, outputs["tokens"][rows], v, True),
                    global_batch))
    return out


def _loss(stage, epoch, labelled, parts, step, cfg):
    balancer = cfg.USL.DIVERSITY_BALANCER
    memories = labelled.memories
    if stage.kind == "camera":
        f, tokens, batch = parts[0]
        return camera_local_loss(memories["camera"], f, batch["pids"], tokens, balancer)
    (f_rgb, tok_rgb, b_rgb), (f_ir, tok_ir, b_ir) = parts
    if stage.kind == "stage1":
        return stage1_loss(memories["ir"], memories["rgb"], f_ir, f_rgb, b_ir["pids"], b_rgb["pids"], tok_ir, tok_rgb,
                           balancer)
    return step(epoch, labelled, f_ir, f_rgb, b_ir, b_rgb, tok_ir, tok_rgb)


def train_epoch(stage, train_model, model, loaders, datasets, labelled, step, optimizer, amp, cfg, ctx, progress,
                stop, logger, tb, rng_after_skip=None):
    """The iterations of ``progress.epoch`` of `stage` from ``progress.iteration`` on (module
    docstring); returns (mean loss terms, images/s, stopped)."""
    epoch, total_iters = progress.epoch, stage.iters
    views = [len(d.views) for d in datasets.values()]
    iterators = [iter(loader) for loader in loaders]
    if progress.iteration:
        logger.info("resuming %s epoch %d at iteration %d: replaying %d batches of data", stage.name, epoch,
                    progress.iteration, progress.iteration)
        for _ in range(progress.iteration):
            for it in iterators:
                next(it)
    if rng_after_skip is not None:
        restore_rng_state(rng_after_skip)
    train_model.train()
    sums, count, images = {}, 0, 0
    bar = tqdm(total=total_iters, initial=progress.iteration, desc="%s epoch %d" % (stage.name, epoch),
               file=sys.stderr, disable=not (ctx.is_main and sys.stderr.isatty()), leave=False, dynamic_ncols=True,
               mininterval=1.0)
    start = window_start = time.perf_counter()
    window_images = 0
    for iteration in range(progress.iteration, total_iters):
        batches = [to_device(next(it), ctx.device) for it in iterators]
        with amp.autocast():
            outputs = train_model(torch.cat([b["images"] for b in batches]),
                                  torch.cat([b["modality"] for b in batches]))
        loss, terms, info = _loss(stage, epoch, labelled, _split(ctx, outputs, batches, views), step, cfg)
        local_bad = not all(math.isfinite(v) for v in terms.values())
        stop_now, any_bad = any_across_ranks(ctx, [stop.requested, local_bad])
        if any_bad:
            check_finite_loss(terms, epoch, iteration, progress.global_step, progress.last_saved)
            raise NonFiniteError("non-finite loss on another process in %s epoch %d, iteration %d. Last good "
                                 "checkpoint: %s" % (stage.name, epoch, iteration, progress.last_saved or "none"))
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        if step is not None:
            step.after_step(model)
        progress.iteration = iteration + 1
        progress.global_step += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        batch_images = sum(b["images"].shape[0] for b in batches) * ctx.world_size
        images += batch_images
        window_images += batch_images
        bar.update(1)
        if (iteration + 1) % cfg.SOLVER.LOG_PERIOD == 0 or iteration + 1 == total_iters:
            now = time.perf_counter()
            logger.info("%s epoch %d [%d/%d] loss %.4f (%s) lr %.2e %.1f img/s%s", stage.name, epoch, iteration + 1,
                        total_iters, terms["total"], format_terms(terms), optimizer.param_groups[0]["lr"],
                        window_images / max(now - window_start, 1e-9),
                        "; %s" % " ".join("%s %.4g" % kv for kv in info.items()) if info else "")
            tb.add_scalars("train/%s" % stage.name, {"loss_" + k: v for k, v in terms.items()}, progress.global_step)
            if info:
                tb.add_scalars("train/%s" % stage.name, dict(info), progress.global_step)
            window_start, window_images = now, 0
        if stop_now:
            break
    bar.close()
    return epoch_result(ctx, sums, count, images, start, progress, total_iters)
