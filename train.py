"""Train a supervised re-identification method (CMFN by default, IV-REID, ...)::

    python train.py [--method cmfn|ivreid|...] --dataset sysu|regdb|llcm|demo [--resume [PATH]] [--overwrite]
                    [KEY VALUE ...]
    torchrun --nproc_per_node N train.py --dataset sysu ...     # DDP, one process per GPU
    sh train_regdb.sh [--method NAME] [KEY VALUE ...]            # the 10 RegDB trials

The method preset (configs/<method>/<dataset>.yaml) names the parts: MODEL.NAME,
LOSS.NAME, DATALOADER.SAMPLER, SOLVER.OPTIMIZER and SOLVER.SCHEDULER. Each epoch ``e``:
reseed every generator from (SEED, e); ``sampler.set_epoch(e)``; the iterations
(:func:`engine.loop.train_one_epoch`); an evaluation when due
(:mod:`engine.evaluate`: no flip, the TEST.FEATURE embedding, the first gallery trial);
``last.pth``, and ``best.pth`` when the selection metric improved. The run directory
(OUTPUT_DIR) is described in :mod:`engine.run_dir`.

``--resume`` continues a run exactly where last.pth (or PATH) left it, mid-epoch included;
the first SIGINT/SIGTERM writes such a checkpoint and exits with 128 + the signal number.
A non-finite loss stops the run.
"""
import argparse
import os
import sys

import torch

from engine.distributed import any_across_ranks, barrier, cleanup, init_distributed, unwrap_model, wrap_model
from engine.evaluate import evaluate, evaluation_due, evaluation_splits, update_best
from engine.loop import train_one_epoch
from engine.run_config import (add_run_arguments, check_run_config, config_differences, parse_run_arguments,
                               resolve_run_config)
from engine.run_dir import BEST_CHECKPOINT, CONFIG_FILE, open_run, trim_metrics
from engine.solver import build_optimizer, build_scheduler
from engine.state import Progress, make_state, restore_state, save_last
from engine.training import (GracefulStop, MixedPrecision, check_finite_state, configure_determinism, seed_epoch,
                             seed_everything)
from utils.config import get_default_config
from utils.errors import ConfigError, run_cli
from utils.io import save_text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a re-identification method.")
    add_run_arguments(parser)
    parser.add_argument("--check-sync", action="store_true",
                        help="debugging: after every step check that all DDP processes hold identical "
                             "parameters (one broadcast of the model per step)")
    return parse_run_arguments(parser, argv)


def train(cfg, args, ctx, resume_ckpt, resume_path, notes):
    from data import build_train_loader
    from data.registry import DATASETS
    from loss import build_criterion, check_outputs
    from model import build_model
    from model.registry import MODELS

    run_dir, resuming = cfg.OUTPUT_DIR, resume_ckpt is not None
    with open_run(run_dir, ctx, resume=resuming, overwrite=args.overwrite) as (logger, tb, metrics_path, removed):
        logger.info("command: %s", " ".join(sys.argv))
        label = getattr(MODELS.get(cfg.MODEL.NAME), "method_label", "")
        logger.info("method %s on %s; run directory %s%s; device %s, %d process(es)%s",
                    cfg.METHOD + (" = " + label if label else ""), cfg.DATASET.NAME,
                    run_dir, " (overwrote %d files of an earlier run)" % len(removed) if removed else "",
                    ctx.device, ctx.world_size, " (%s)" % ctx.backend if ctx.distributed else "")
        logger.info("config (non-default keys): %s", "; ".join(config_differences(get_default_config(), cfg))
                    or "all defaults")
        for note in notes:
            logger.warning(note)
        if ctx.distributed:
            logger.info("DDP: each of the %d processes computes the loss on its shard of %d identities",
                        ctx.world_size, cfg.DATALOADER.NUM_IDS // ctx.world_size)
        if cfg.SOLVER.SELECT_BY == "test":
            logger.warning("best.pth is selected on the TEST set by %s (the released recipe): its figures are "
                           "optimistic; SOLVER.SELECT_BY val (with DATASET.VAL_IDS) or last avoids that",
                           cfg.SOLVER.BEST_METRIC)

        # --- the parts
        seed_everything(cfg.SEED)
        configure_determinism(cfg.DETERMINISTIC)
        if ctx.is_main:
            DATASETS.get(cfg.DATASET.NAME).prepare(cfg)
        barrier(ctx)
        loader, sampler, train_set = build_train_loader(cfg, ctx.rank, ctx.world_size)
        num_classes = train_set.num_classes
        logger.info("training set: %d identities, %d visible + %d infrared images; sampler %s, %d iterations in "
                    "epoch 0 of %d images", num_classes, int((train_set.modality == 0).sum()),
                    int((train_set.modality == 1).sum()), cfg.DATALOADER.SAMPLER, len(loader),
                    sampler.batch_size * (2 if sampler.collate == "paired" else 1) * ctx.world_size)
        splits = evaluation_splits(cfg) if ctx.is_main else {}
        model = build_model(cfg, num_classes).to(ctx.device)
        if cfg.SOLVER.CHANNELS_LAST:
            model = model.to(memory_format=torch.channels_last)
        criterion = build_criterion(cfg)
        check_outputs(criterion, type(model))
        amp = MixedPrecision(cfg.SOLVER.AMP, ctx.device.type)
        slow_amp = amp.warning()
        if slow_amp:
            logger.warning("%s", slow_amp)
        train_model = wrap_model(model, ctx, cfg.SOLVER.SYNC_BN)
        model = unwrap_model(train_model)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, len(loader))
        progress, rng_after_skip = Progress(), None
        if resuming:
            rng_after_skip = restore_state(resume_ckpt, model, optimizer, scheduler, amp, progress, ctx, logger,
                                           resume_path)
            dropped = trim_metrics(metrics_path, progress.epoch - 1) if ctx.is_main else 0
            if dropped:
                logger.info("dropped %d metrics.jsonl records of epochs after the checkpoint", dropped)
        if cfg.SOLVER.COMPILE:
            train_model = torch.compile(train_model, backend=cfg.SOLVER.COMPILE_BACKEND)
        logger.info("model %s/%s: %.2fM parameters, %d classes; criterion %s; optimizer %s, schedule %s per %s; "
                    "AMP %s, channels_last %s, compile %s%s", cfg.MODEL.NAME, cfg.MODEL.BACKBONE,
                    sum(p.numel() for p in model.parameters()) / 1e6, num_classes, cfg.LOSS.NAME,
                    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.SCHEDULER, cfg.SOLVER.SCHEDULE_UNIT, cfg.SOLVER.AMP,
                    cfg.SOLVER.CHANNELS_LAST, cfg.SOLVER.COMPILE,
                    " (%s)" % cfg.SOLVER.COMPILE_BACKEND if cfg.SOLVER.COMPILE else "")
        if ctx.is_main:
            # written once the parts are in place: a run that fails to start leaves no
            # config.yaml behind, so rerunning it needs no --overwrite
            save_text(os.path.join(run_dir, CONFIG_FILE), cfg.dump())
        if cfg.SOLVER.EVAL_BEFORE_TRAIN and not resuming:
            if ctx.is_main:
                evaluate(model, splits, cfg, ctx.device, -1, logger, tb, metrics_path)
            barrier(ctx)

        def checkpoint(completed_epoch, also_best=False):
            state = make_state(model, optimizer, scheduler, amp, cfg, num_classes, progress, completed_epoch, ctx)
            save_last(state, run_dir, progress, also_best)

        # --- the loop
        with GracefulStop() as stop:
            start_epoch, first_step = progress.epoch, progress.global_step
            for epoch in range(start_epoch, cfg.SOLVER.MAX_EPOCHS):
                progress.epoch = epoch
                if any_across_ranks(ctx, [stop.requested])[0]:
                    if ctx.is_main:
                        checkpoint(epoch - 1)
                    logger.warning("stopped by signal %d before epoch %d; resumable checkpoint %s", stop.signum,
                                   epoch, progress.last_saved)
                    barrier(ctx)
                    return stop.exit_code
                seed_epoch(cfg.SEED, epoch, ctx.rank)
                sampler.set_epoch(epoch)
                means, speed, stopped = train_one_epoch(
                    train_model, loader, criterion, optimizer, scheduler, amp, cfg, ctx, progress, stop, logger, tb,
                    rng_after_skip if epoch == start_epoch else None, args.check_sync)
                if stopped:
                    if ctx.is_main:
                        checkpoint(epoch - 1)
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
                    records = evaluate(model, splits, cfg, ctx.device, epoch, logger, tb, metrics_path) \
                        if evaluation_due(cfg, epoch) else {}
                    improved = update_best(cfg, progress, records, epoch)
                    checkpoint(epoch, also_best=improved)
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


def check_supervised(cfg):
    """ConfigError for a model that trains without labels (no criterion of this script fits it)."""
    from model.registry import MODELS

    if not getattr(MODELS.get(cfg.MODEL.NAME), "supervised", True):
        raise ConfigError("MODEL.NAME %s trains without labels, through the clustering loop of train_usl.py: run "
                          "python train_usl.py --method %s --dataset %s" % (cfg.MODEL.NAME, cfg.METHOD,
                                                                           cfg.DATASET.NAME))


def main(argv=None):
    """Train; returns the exit code (0, or 128 + signal after a graceful stop)."""
    args = parse_args(argv)
    cfg, resume_ckpt, resume_path, notes = resolve_run_config(args)
    check_supervised(cfg)
    ctx = init_distributed(cfg.DEVICE)
    try:
        check_run_config(cfg, ctx)
        return train(cfg, args, ctx, resume_ckpt, resume_path, notes)
    finally:
        cleanup(ctx)


if __name__ == "__main__":
    sys.exit(run_cli(main))
