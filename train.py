"""Train CMFN (or the baseline) for visible-infrared person re-identification.

Spec: ``training_recipe.md`` 3 (recipe) and 4.2 (the in-training evaluation)::

    python train.py --dataset sysu|regdb|llcm|demo [--resume [PATH]] [--overwrite] [KEY VALUE ...]
    torchrun --nproc_per_node N train.py --dataset sysu ...     # DDP, one process per GPU
    sh train_regdb.sh [KEY VALUE ...]                            # the 10 RegDB trials

Each epoch ``e``: reseed every generator from (SEED, e); ``sampler.set_epoch(e)``;
``scheduler.step(e)``; the iterations; an evaluation when due; ``last.pth`` (and ``best.pth``
when the selection metric improved). The run directory (OUTPUT_DIR) is described in
:mod:`utils.run_dir`.

Evaluation (as released: no flip, the TEST.FEATURE embedding, default the 6-sum): SYSU and
LLCM on gallery trial 0 only, RegDB on the trial's own test lists, plus the held-out
validation identities when SOLVER.SELECT_BY is ``val``. Rank-1/5/10/20, mAP and mINP go to the
log, tensorboard and ``metrics.jsonl`` (fractions). Model selection (``best.pth``):
``test`` (released: on the test set, so the selected figures are optimistic), ``val`` or
``last``.

``--resume`` continues a run exactly where last.pth (or PATH) left it, mid-epoch included;
the first SIGINT/SIGTERM writes such a checkpoint and exits with 128 + the signal number.
A non-finite loss stops the run (:class:`utils.training.NonFiniteError`).
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from data.errors import DatasetError
from utils.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from utils.config import (ConfigError, add_config_arguments, config_from_args, config_from_string,
                          default_output_dir, get_default_config, merge_from_list)
from utils.distributed import (any_across_ranks, barrier, cleanup, init_distributed, mean_across_ranks,
                               parameters_in_sync, unwrap_model, wrap_model)
from utils.io import append_jsonl, save_text
from utils.logger import TensorboardWriter, close_logger, setup_logger
from utils.run_dir import (BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, LOG_FILE, METRICS_FILE,
                           RunDirError, check_run_dir, prepare_run_dir, trim_metrics)
from utils.training import (GracefulStop, MixedPrecision, NonFiniteError, capture_rng_state,
                            check_finite_loss, check_finite_state, configure_determinism, restore_rng_state,
                            seed_epoch, seed_everything)

# Errors with a message that says it all: one line on stderr (and in train.log), no traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, RunDirError, NonFiniteError)
METRIC_KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
SELECT_BY = ("test", "val", "last")


# ------------------------------------------------------------------------ command line
def _is_config_key(token):
    node = get_default_config()
    for part in token.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train CMFN for visible-infrared person re-identification.")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue a run from checkpoint PATH (default: OUTPUT_DIR/last.pth); without "
                             "--dataset/--config the checkpoint's own config is used (overrides still apply)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that already holds a run (deletes its files)")
    parser.add_argument("--check-sync", action="store_true",
                        help="debugging: after every step check that all DDP processes hold identical "
                             "parameters (one broadcast of the model per step)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    opts = list(args.opts or [])
    # "--resume SOLVER.X 1": argparse hands the first override to --resume.
    if args.resume and not os.path.exists(args.resume) and _is_config_key(args.resume):
        opts.insert(0, args.resume)
        args.resume = ""
    # Flags after the first KEY VALUE pair land in the overrides; take them back out.
    rest = []
    while opts:
        token = opts.pop(0)
        if token == "--overwrite":
            args.overwrite = True
        elif token == "--check-sync":
            args.check_sync = True
        elif token == "--resume":
            args.resume = opts.pop(0) if opts and not _is_config_key(opts[0]) else ""
        else:
            rest.append(token)
    args.opts = rest
    return args


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def config_differences(a, b):
    """'KEY: a -> b' for every key whose value differs."""
    fa, fb = _flatten(a), _flatten(b)
    return ["%s: %r -> %r" % (k, fa[k], fb.get(k)) for k in sorted(fa) if fa[k] != fb.get(k)]


def build_run_config(args):
    """(cfg, resume checkpoint or None, resume path or None, notes for the log)."""
    notes = []
    ckpt = None
    if args.resume is not None and args.resume and not (args.dataset or args.config):
        ckpt = load_checkpoint(args.resume)
        cfg = config_from_string(ckpt["config"], source=args.resume)
        merge_from_list(cfg, args.opts)
    else:
        cfg = config_from_args(args, freeze=False)
    cfg.OUTPUT_DIR = default_output_dir(cfg)
    resume_path = None
    if args.resume is not None:
        resume_path = args.resume or os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)
        if ckpt is None:
            if not os.path.isfile(resume_path):
                raise CheckpointError("--resume: no checkpoint at %s (nothing to resume in OUTPUT_DIR %s)"
                                      % (resume_path, cfg.OUTPUT_DIR))
            ckpt = load_checkpoint(resume_path)
            saved = config_from_string(ckpt["config"], source=resume_path)
            diff = config_differences(saved, cfg)
            if diff:
                notes.append("resumed with a config that differs from the checkpoint's: " + "; ".join(diff))
    cfg.freeze()
    return cfg, ckpt, resume_path, notes


def check_config(cfg, ctx):
    """Clear errors for combinations that would fail later, deep inside the run."""
    solver = cfg.SOLVER
    if solver.SELECT_BY not in SELECT_BY:
        raise ConfigError("SOLVER.SELECT_BY must be one of %s, got %r" % (", ".join(SELECT_BY), solver.SELECT_BY))
    if solver.SELECT_BY == "val" and cfg.DATASET.VAL_IDS <= 0:
        raise ConfigError("SOLVER.SELECT_BY val needs held-out identities: set DATASET.VAL_IDS > 0")
    if solver.BEST_METRIC not in ("rank1", "mAP", "mINP"):
        raise ConfigError("SOLVER.BEST_METRIC must be rank1, mAP or mINP, got %r" % solver.BEST_METRIC)
    if solver.EVAL_PERIOD < 1:
        raise ConfigError("SOLVER.EVAL_PERIOD must be >= 1, got %d" % solver.EVAL_PERIOD)
    if solver.MAX_EPOCHS < 1:
        raise ConfigError("SOLVER.MAX_EPOCHS must be >= 1, got %d" % solver.MAX_EPOCHS)
    if solver.SYNC_BN and ctx.device.type != "cuda":
        raise ConfigError("SOLVER.SYNC_BN needs CUDA devices (SyncBatchNorm has no CPU kernel); set it to false")
    if cfg.DATALOADER.NUM_IDS % ctx.world_size:
        raise ConfigError("DATALOADER.NUM_IDS (%d identities per batch) must be divisible by the number of "
                          "processes (%d)" % (cfg.DATALOADER.NUM_IDS, ctx.world_size))
    MixedPrecision(solver.AMP, ctx.device.type)


# --------------------------------------------------------------------------- evaluation
def evaluation_splits(cfg):
    """name -> (TestSplit, trial info) evaluated during training (rank 0 only)."""
    from data import build_test_split, build_val_split

    test = build_test_split(cfg)
    info = {"trial": int(cfg.DATASET.TRIAL)} if cfg.DATASET.NAME == "regdb" else {"gallery_trial": 0}
    if len(test.trials) > 1:
        # the released train.py evaluates SYSU/LLCM on gallery trial 0 only
        test = dataclasses.replace(test, trials=test.trials[:1])
    splits = {"test": (test, info)}
    if cfg.SOLVER.SELECT_BY == "val":
        splits["val"] = (build_val_split(cfg), {"val_ids": int(cfg.DATASET.VAL_IDS)})
    return splits


def evaluate(model, splits, cfg, device, epoch, logger, tb, metrics_path):
    """Evaluate every split; append to metrics.jsonl; return name -> record."""
    from utils.features import evaluate_split

    records = {}
    for name, (split, info) in splits.items():
        start = time.perf_counter()
        result = evaluate_split(model, split, cfg, device, flip=False)
        mean = result["mean"]
        record = {"epoch": int(epoch), "split": name}
        record.update({k: float(mean[k]) if k in mean else None for k in METRIC_KEYS})  # rank20 needs MAX_RANK 20
        record.update(info)
        record.update({"feature": cfg.TEST.FEATURE, "flip": False, "num_query": len(split.query)})
        append_jsonl(metrics_path, record)
        records[name] = record
        label = "untrained" if epoch < 0 else "epoch %d" % epoch
        logger.info("eval %s (%s, %s, no flip): Rank-1 %.2f%% | Rank-5 %.2f%% | Rank-10 %.2f%% | Rank-20 %.2f%% | "
                    "mAP %.2f%% | mINP %.2f%%  [%.1fs]", name, label, cfg.TEST.FEATURE,
                    *(100 * (record[k] or 0.0) for k in METRIC_KEYS), time.perf_counter() - start)
        tb.add_scalars("eval_%s" % name, {k: record[k] for k in ("rank1", "mAP", "mINP")}, epoch + 1)
    return records


def evaluation_due(cfg, epoch):
    solver = cfg.SOLVER
    if epoch == solver.MAX_EPOCHS - 1:
        return True
    return epoch >= solver.EVAL_START and (epoch - solver.EVAL_START) % solver.EVAL_PERIOD == 0


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class Progress:
    """Where the run stands; `iteration` = iterations of the current epoch already done."""
    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best_value: float = None
    best_epoch: int = None
    last_saved: str = None


def train_one_epoch(train_model, loader, criterion, optimizer, amp, cfg, ctx, progress, stop, logger, tb,
                    rng_after_skip=None, check_sync=False):
    """One epoch from iteration progress.iteration on; returns (mean loss terms, images/s, stopped)."""
    epoch = progress.epoch
    device = ctx.device
    memory_format = torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format
    lr = optimizer.param_groups[0]["lr"]
    total_iters = len(loader)
    batch_iter = iter(loader)
    if progress.iteration:
        # Load (and drop) the batches the interrupted run already trained on, so that the
        # loader continues exactly where it stopped, whatever its workers' state.
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
        img_v, img_i, label_v, label_i = next(batch_iter)
        img_v = img_v.to(device, non_blocking=True, memory_format=memory_format)
        img_i = img_i.to(device, non_blocking=True, memory_format=memory_format)
        label_v = label_v.to(device, non_blocking=True)
        label_i = label_i.to(device, non_blocking=True)
        with amp.autocast():
            feat, logits, loss_ort = train_model(img_v, img_i)
        loss, terms = criterion(feat, logits, loss_ort, label_v, label_i, epoch)
        losses = {k: v for k, v in terms.items() if k != "dcl_weight"}
        local_bad = not all(math.isfinite(v) for v in losses.values())
        stop_now, any_bad = any_across_ranks(ctx, [stop.requested, local_bad])
        if any_bad:
            check_finite_loss(losses, epoch, iteration, progress.global_step, progress.last_saved)
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
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        batch_images = (img_v.shape[0] + img_i.shape[0]) * ctx.world_size
        images += batch_images
        window_images += batch_images
        bar.update(1)
        if bar.n % 10 == 0 or iteration + 1 == total_iters:
            bar.set_postfix_str("loss %.3f (%s) lr %.2e %.1f img/s" % (
                losses["total"], " ".join("%s %.3f" % (k, v) for k, v in losses.items() if k != "total"),
                lr, images / max(time.perf_counter() - start, 1e-9)), refresh=False)
        if (iteration + 1) % cfg.SOLVER.LOG_PERIOD == 0 or iteration + 1 == total_iters:
            now = time.perf_counter()
            logger.info("epoch %d [%d/%d] loss %.4f (%s) lr %.2e %.1f img/s", epoch, iteration + 1, total_iters,
                        losses["total"], " ".join("%s %.4f" % (k, v) for k, v in losses.items() if k != "total"),
                        lr, window_images / max(now - window_start, 1e-9))
            tb.add_scalars("train", {"loss_" + k: v for k, v in losses.items()}, progress.global_step)
            window_start, window_images = now, 0
        if stop_now:
            break
    bar.close()
    seconds = time.perf_counter() - start
    means = mean_across_ranks(ctx, {k: v / count for k, v in sums.items()}) if count else {}
    return means, images / max(seconds, 1e-9), progress.iteration < total_iters


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


def train(cfg, args, ctx, resume_ckpt, resume_path, notes):
    from data import build_train_loader
    from loss import build_loss
    from model import build_model
    from utils.solver import build_optimizer, build_scheduler

    run_dir = cfg.OUTPUT_DIR
    resuming = resume_ckpt is not None
    check_run_dir(run_dir, resume=resuming, overwrite=args.overwrite)
    barrier(ctx)
    removed = prepare_run_dir(run_dir, resume=resuming, overwrite=args.overwrite) if ctx.is_main else []
    logger = setup_logger(os.path.join(run_dir, LOG_FILE) if ctx.is_main else None, ctx.rank)
    tb = TensorboardWriter(run_dir, enabled=ctx.is_main)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    try:
        logger.info("command: %s", " ".join(sys.argv))
        logger.info("run directory %s%s; device %s, %d process(es)%s", run_dir,
                    " (overwrote %d files of an earlier run)" % len(removed) if removed else "",
                    ctx.device, ctx.world_size, " (%s)" % ctx.backend if ctx.distributed else "")
        non_default = config_differences(get_default_config(), cfg)
        logger.info("config (non-default keys): %s", "; ".join(non_default) or "all defaults")
        for note in notes:
            logger.warning(note)
        if cfg.SOLVER.SELECT_BY == "test":
            logger.warning("best.pth is selected on the TEST set by %s (the released recipe): its figures are "
                           "optimistic; SOLVER.SELECT_BY val (with DATASET.VAL_IDS) or last avoids that",
                           cfg.SOLVER.BEST_METRIC)
        if ctx.distributed:
            logger.info("DDP: each of the %d processes computes the loss on its shard of %d identities",
                        ctx.world_size, cfg.DATALOADER.NUM_IDS // ctx.world_size)

        seed_everything(cfg.SEED)
        configure_determinism(cfg.DETERMINISTIC)
        if cfg.DATASET.NAME == "demo":
            from data import ensure_demo_dataset

            if ctx.is_main:
                ensure_demo_dataset(cfg)
            barrier(ctx)
        loader, sampler, train_set = build_train_loader(cfg, ctx.rank, ctx.world_size)
        logger.info("training set: %d identities, %d visible + %d infrared images; %d iterations per epoch of "
                    "%d+%d images", train_set.num_classes, len(train_set.rgb_labels), len(train_set.ir_labels),
                    len(loader), cfg.DATALOADER.NUM_IDS * cfg.DATALOADER.NUM_POS,
                    cfg.DATALOADER.NUM_IDS * cfg.DATALOADER.NUM_POS)
        splits = evaluation_splits(cfg) if ctx.is_main else {}

        model = build_model(cfg, train_set.num_classes).to(ctx.device)
        if cfg.SOLVER.CHANNELS_LAST:
            model = model.to(memory_format=torch.channels_last)
        criterion = build_loss(cfg)
        amp = MixedPrecision(cfg.SOLVER.AMP, ctx.device.type)
        progress = Progress()
        rng_after_skip = None
        train_model = wrap_model(model, ctx, cfg.SOLVER.SYNC_BN)
        model = unwrap_model(train_model)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        if resuming:
            rng_after_skip = restore_state(resume_ckpt, model, optimizer, scheduler, amp, progress, ctx, logger,
                                           resume_path)
            if ctx.is_main:
                dropped = trim_metrics(metrics_path, progress.epoch - 1)
                if dropped:
                    logger.info("dropped %d metrics.jsonl records of epochs after the checkpoint", dropped)
        if cfg.SOLVER.COMPILE:
            train_model = torch.compile(train_model, backend=cfg.SOLVER.COMPILE_BACKEND)
        logger.info("model %s/%s: %.2fM parameters, %d classes; AMP %s, channels_last %s, compile %s%s",
                    cfg.MODEL.NAME, cfg.MODEL.BACKBONE, sum(p.numel() for p in model.parameters()) / 1e6,
                    train_set.num_classes, cfg.SOLVER.AMP, cfg.SOLVER.CHANNELS_LAST, cfg.SOLVER.COMPILE,
                    " (%s)" % cfg.SOLVER.COMPILE_BACKEND if cfg.SOLVER.COMPILE else "")

        if ctx.is_main:
            # written once the data and the model are in place: a run that fails to start
            # leaves no config.yaml behind, so rerunning it needs no --overwrite
            save_text(os.path.join(run_dir, CONFIG_FILE), cfg.dump())

        if cfg.SOLVER.EVAL_BEFORE_TRAIN and not resuming:
            if ctx.is_main:
                evaluate(model, splits, cfg, ctx.device, -1, logger, tb, metrics_path)
            barrier(ctx)

        num_classes = train_set.num_classes
        with GracefulStop() as stop:
            start_epoch, first_step = progress.epoch, progress.global_step
            for epoch in range(start_epoch, cfg.SOLVER.MAX_EPOCHS):
                progress.epoch = epoch
                if any_across_ranks(ctx, [stop.requested])[0]:
                    if ctx.is_main:
                        save_last(make_state(model, optimizer, scheduler, amp, cfg, num_classes, progress, epoch - 1,
                                             ctx), run_dir, progress)
                    logger.warning("stopped by signal %d before epoch %d; resumable checkpoint %s", stop.signum,
                                   epoch, progress.last_saved)
                    barrier(ctx)
                    return stop.exit_code
                seed_epoch(cfg.SEED, epoch, ctx.rank)
                sampler.set_epoch(epoch)
                scheduler.step(epoch)
                means, speed, stopped = train_one_epoch(
                    train_model, loader, criterion, optimizer, amp, cfg, ctx, progress, stop, logger, tb,
                    rng_after_skip if epoch == start_epoch else None, args.check_sync)
                if stopped:
                    if ctx.is_main:
                        save_last(make_state(model, optimizer, scheduler, amp, cfg, num_classes, progress, epoch - 1,
                                             ctx), run_dir, progress)
                        logger.warning("stopped by signal %d in epoch %d after %d iterations; resume with --resume "
                                       "(checkpoint %s)", stop.signum, epoch, progress.iteration, progress.last_saved)
                    barrier(ctx)
                    return stop.exit_code
                progress.iteration = 0
                logger.info("epoch %d done: %s; lr %.2e; %.1f img/s", epoch,
                            " ".join("%s %.4f" % kv for kv in means.items()), scheduler.lr_at(epoch), speed)
                tb.add_scalar("train/lr", scheduler.lr_at(epoch), epoch)
                tb.add_scalar("train/images_per_s", speed, epoch)
                if ctx.is_main:
                    check_finite_state(model.state_dict(), epoch, progress.last_saved)
                    improved = False
                    if evaluation_due(cfg, epoch):
                        records = evaluate(model, splits, cfg, ctx.device, epoch, logger, tb, metrics_path)
                        chosen = records.get(cfg.SOLVER.SELECT_BY)
                        if chosen is not None:
                            value = chosen[cfg.SOLVER.BEST_METRIC]
                            improved = progress.best_value is None or value > progress.best_value
                            if improved:
                                progress.best_value, progress.best_epoch = value, epoch
                    if cfg.SOLVER.SELECT_BY == "last":
                        improved = True
                        progress.best_epoch = epoch
                    save_last(make_state(model, optimizer, scheduler, amp, cfg, num_classes, progress, epoch, ctx),
                              run_dir, progress, also_best=improved)
                    if improved and cfg.SOLVER.SELECT_BY != "last":
                        logger.info("new best %s %s %.2f%% at epoch %d -> %s", cfg.SOLVER.SELECT_BY,
                                    cfg.SOLVER.BEST_METRIC, 100 * progress.best_value, epoch, BEST_CHECKPOINT)
                    tb.flush()
                barrier(ctx)
        if args.check_sync:
            logger.info("check-sync: parameters identical on all %d processes after each of the %d steps",
                        ctx.world_size, progress.global_step - first_step)
        if progress.best_value is not None:
            logger.info("finished: best %s %s %.2f%% at epoch %d (best.pth); last.pth = epoch %d",
                        cfg.SOLVER.SELECT_BY, cfg.SOLVER.BEST_METRIC, 100 * progress.best_value, progress.best_epoch,
                        cfg.SOLVER.MAX_EPOCHS - 1)
        else:
            logger.info("finished %d epochs; last.pth = best.pth (SOLVER.SELECT_BY %s)", cfg.SOLVER.MAX_EPOCHS,
                        cfg.SOLVER.SELECT_BY)
        return 0
    except USER_ERRORS as exc:
        logger.error("%s", exc)
        exc.logged = True
        raise
    finally:
        tb.close()
        close_logger(logger)


def main(argv=None):
    """Train; returns the exit code (0, or 128 + signal after a graceful stop)."""
    args = parse_args(argv)
    cfg, resume_ckpt, resume_path, notes = build_run_config(args)
    ctx = init_distributed(cfg.DEVICE)
    try:
        check_config(cfg, ctx)
        return train(cfg, args, ctx, resume_ckpt, resume_path, notes)
    finally:
        cleanup(ctx)


def cli():
    try:
        return main()
    except USER_ERRORS as exc:
        if not getattr(exc, "logged", False):
            print("error: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
