"""Train an unsupervised visible-infrared method (TokenMatcher) with its clustering loop::

    python train_usl.py --method tokenmatcher --dataset sysu|regdb|demo [--resume [PATH]] [--overwrite]
                        [KEY VALUE ...]
    python train_usl.py --method tokenmatcher --dataset sysu --stage stage2 --from CKPT [KEY VALUE ...]
    torchrun --nproc_per_node N train_usl.py --dataset sysu ...     # DDP, one process per GPU

No identity label is read for training. The run goes through the stages of the dataset in
order (:mod:`engine.usl.stages`): SYSU-MM01 (and the synthetic ``demo``) stage 1, the six
camera-local runs, stage 2; RegDB stage 1 and stage 2 of the trial DATASET.TRIAL (one run per
trial). Each epoch of a stage: re-cluster the training images and rebuild the cluster memories
(:mod:`engine.usl.labelling`; the pseudo-label quality against the true identities is logged
for monitoring only, :mod:`engine.usl.monitor`), train ``iters`` iterations
(:mod:`engine.usl.epoch`), evaluate with the test protocol and select the stage's model
(:mod:`engine.usl.evaluation`; stage 1 by mAP, stage 2 by Rank-1, on the test set as released
unless SOLVER.SELECT_BY says val or last), write ``last.pth``. Stages 2 and the camera-local
runs start from stage 1's selected model (``stage1_best.pth``); ``best.pth`` is the model of
the run's last stage (stage 2), for test.py.

``--resume`` continues a run exactly where last.pth (or PATH) left it, inside any stage and
epoch, with the epoch's pseudo labels, memory banks, neighbour sets, match and the camera-local
clusterings restored; the first SIGINT/SIGTERM writes such a checkpoint and exits with
128 + the signal number. ``--stage NAME --from CKPT`` runs one stage alone, starting from the
weights of CKPT (any checkpoint of this project holding the encoder, e.g. a stage1_best.pth or
a converted released checkpoint); a stage-2 run alone reads the camera-local clusterings from
USL.CAMERA_LOCAL_DIR (default OUTPUT_DIR). The run directory is that of train.py plus
``stage<k>_best.pth`` and ``camera_local_<cam>.pth``.
"""
import argparse
import os
import sys

import torch

from engine.checkpoint import CheckpointError
from engine.distributed import any_across_ranks, barrier, cleanup, init_distributed, unwrap_model, wrap_model
from engine.run_config import add_run_arguments, config_differences, parse_run_arguments, resolve_run_config
from engine.run_dir import CONFIG_FILE, open_run
from engine.training import GracefulStop, MixedPrecision, check_finite_state, configure_determinism, seed_everything
from engine.usl.stages import run_plan
from engine.usl.state import (BEST, USLProgress, camera_local_file, check_usl_checkpoint, load_camera_local,
                              make_state, restore_progress, save_camera_local, save_last, save_model,
                              stage_best_file, trim_usl_metrics)
from utils.config import get_default_config
from utils.errors import ConfigError, run_cli
from utils.io import save_text

DEFAULT_METHOD = "tokenmatcher"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train an unsupervised visible-infrared ReID method.")
    add_run_arguments(parser)
    parser.add_argument("--stage", metavar="NAME", help="run this stage alone (stage1, cam0..cam5, stage2); "
                                                        "needs --from")
    parser.add_argument("--from", dest="from_ckpt", metavar="CKPT",
                        help="with --stage: the checkpoint whose weights the stage starts from")
    args = parse_run_arguments(parser, argv)
    if args.method is None and not (args.resume and not args.dataset and not args.config):
        args.method = DEFAULT_METHOD
    return args


def check_arguments(args, cfg, resume_ckpt, resume_path):
    """One clear error for a bad combination of options, config and checkpoint."""
    from model.registry import MODELS

    if getattr(MODELS.get(cfg.MODEL.NAME), "supervised", True):
        raise ConfigError("train_usl.py trains models without labels (MODEL.NAME tokenmatcher); MODEL.NAME %s of "
                          "method %s is trained with train.py" % (cfg.MODEL.NAME, cfg.METHOD))
    if args.resume is not None:
        check_usl_checkpoint(resume_ckpt, resume_path)
        if args.from_ckpt:
            raise ConfigError("--from starts a stage from new weights; it does not combine with --resume")
        saved = resume_ckpt["usl"]["plan"]
        if args.stage and saved != [args.stage]:
            raise ConfigError("--stage %s, but %s belongs to a run of %s" % (args.stage, resume_path, ", ".join(saved)))
        return saved[0] if len(saved) == 1 else None
    if args.stage and not args.from_ckpt:
        raise ConfigError("--stage %s needs --from CKPT: the checkpoint whose weights the stage starts from "
                          "(e.g. OUTPUT_DIR/stage1_best.pth)" % args.stage)
    if args.from_ckpt and not args.stage:
        raise ConfigError("--from %s needs --stage NAME (the stage to run from it); a full run starts from the "
                          "built model" % args.from_ckpt)
    return args.stage


def check_usl_config(cfg, ctx):
    usl = cfg.USL
    if [int(v) for v in usl.INPUT.SIZE] != [int(v) for v in cfg.INPUT.SIZE_TRAIN]:
        raise ConfigError("USL.INPUT.SIZE %s must equal INPUT.SIZE_TRAIN %s (the encoder's input size)"
                          % (list(usl.INPUT.SIZE), list(cfg.INPUT.SIZE_TRAIN)))
    if usl.BATCH_SIZE < 2 or usl.BATCH_SIZE % (2 * ctx.world_size):
        raise ConfigError("USL.BATCH_SIZE (%d IR images, half as many RGB images) must be a positive multiple of "
                          "2 x the number of processes (%d)" % (usl.BATCH_SIZE, ctx.world_size))
    if cfg.SOLVER.SELECT_BY == "val" and cfg.DATASET.VAL_IDS <= 0:
        raise ConfigError("SOLVER.SELECT_BY val needs held-out identities: set DATASET.VAL_IDS > 0")
    if cfg.SOLVER.SYNC_BN and ctx.device.type != "cuda":
        raise ConfigError("SOLVER.SYNC_BN needs CUDA devices; set it to false")
    MixedPrecision(cfg.SOLVER.AMP, ctx.device.type)


def load_weights(model, path, what):
    """Fill `model` from the checkpoint `path` (of this project, holding the same encoder)."""
    from model import load_model

    loaded = load_model(path)
    # CMAG's encoder is TokenMatcher's under another name: either one starts the other
    if not (isinstance(loaded, type(model)) or isinstance(model, type(loaded))):
        raise CheckpointError("%s holds a %s model, not the %s encoder (%s)" % (path, type(loaded).__name__,
                                                                              type(model).__name__, what))
    own, state = model.state_dict(), loaded.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if wrong or set(state) != set(own):
        raise CheckpointError("%s does not fit the configured encoder (%s): %d tensors differ, e.g. %s; check "
                              "MODEL.TOKENMATCHER.*" % (path, what, len(wrong) or len(set(state) ^ set(own)),
                                                        (wrong or sorted(set(state) ^ set(own)))[:3]))
    model.load_state_dict(state)


def build_optimizer(model, step, stage, cfg):
    """SOLVER.OPTIMIZER over the encoder's groups (and the stage-2 step's), at the stage's lr."""
    from engine.solver import OPTIMIZERS
    from engine.usl_schedule import CosineAnnealing

    groups = model.param_groups(cfg) + (step.param_groups() if step is not None and stage.kind == "stage2" else [])
    groups = [dict(g, lr=stage.lr * g["lr_factor"]) for g in groups]
    optimizer = OPTIMIZERS.get(cfg.SOLVER.OPTIMIZER)(groups, cfg.SOLVER)
    return optimizer, CosineAnnealing(optimizer, stage.lr, stage.t_max, stage.eta_min)


def train(cfg, args, ctx, resume_ckpt, resume_path, plan, notes):
    from data.pseudo import usl_listings
    from data.registry import DATASETS, get_dataset
    from engine.usl.epoch import STAGE2_STEPS, epoch_loaders, seed_iterations, seed_labelling, stage_datasets, \
        train_epoch
    from engine.usl.evaluation import evaluate, evaluation_due, evaluation_splits, update_best
    from engine.usl.labelling import EpochLabeller, EpochLabels, calibrate_batchnorm, new_selection, \
        training_listings
    from engine.usl.monitor import report
    from model import build_model

    run_dir, resuming = cfg.OUTPUT_DIR, resume_ckpt is not None
    start_from = resume_ckpt["usl"]["start_from"] if resuming else (args.from_ckpt or "")
    with open_run(run_dir, ctx, resume=resuming, overwrite=args.overwrite) as (logger, tb, metrics_path, removed):
        logger.info("command: %s", " ".join(sys.argv))
        logger.info("method %s (unsupervised) on %s; stages %s%s; run directory %s%s; device %s, %d process(es)",
                    cfg.METHOD, cfg.DATASET.NAME, ", ".join(s.name for s in plan),
                    " from %s" % start_from if start_from else "", run_dir,
                    " (overwrote %d files of an earlier run)" % len(removed) if removed else "", ctx.device,
                    ctx.world_size)
        logger.info("config (non-default keys): %s", "; ".join(config_differences(get_default_config(), cfg))
                    or "all defaults")
        for note in notes:
            logger.warning(note)
        if cfg.SOLVER.SELECT_BY == "test":
            logger.warning("the stages' models are selected on the TEST set (the released recipe): their figures "
                           "are optimistic; SOLVER.SELECT_BY val (with DATASET.VAL_IDS) or last avoids that")

        # --- the parts
        seed_everything(cfg.SEED)
        configure_determinism(cfg.DETERMINISTIC)
        if ctx.is_main:
            DATASETS.get(cfg.DATASET.NAME).prepare(cfg)
        barrier(ctx)
        listings = training_listings(usl_listings(get_dataset(cfg)), cfg)
        if cfg.USL.PRELOAD:
            listings = tuple(lst.preloaded(cfg.USL.INPUT.SIZE) for lst in listings)
        logger.info("training set: %d visible + %d infrared images, identities not read (monitoring only)%s",
                    len(listings[0]), len(listings[1]),
                    "; %d identities held out for selection" % cfg.DATASET.VAL_IDS
                    if cfg.SOLVER.SELECT_BY == "val" else "")
        labeller = EpochLabeller(cfg, listings, ctx.device)
        splits = evaluation_splits(cfg) if ctx.is_main else {}
        model = build_model(cfg, 1).to(ctx.device)
        if cfg.USL.SAME_STEM_INIT and not cfg.MODEL.PRETRAINED:
            model.stems["infrared"].load_state_dict(model.stems["visible"].state_dict())
        amp = MixedPrecision(cfg.SOLVER.AMP, ctx.device.type)
        slow_amp = amp.warning()
        if slow_amp:
            logger.warning("%s", slow_amp)
        # a camera-local run trains one modality's stem only: the other one's parameters sit out
        train_model = wrap_model(model, ctx, cfg.SOLVER.SYNC_BN, find_unused_parameters=True)
        model = unwrap_model(train_model)
        step = STAGE2_STEPS.get(cfg.METHOD)(cfg, model) if any(s.kind == "stage2" for s in plan) else None
        label = getattr(model, "method_label", "")
        logger.info("model %s%s: %.2fM parameters, K=%d tokens, %d-d descriptor; AMP %s", cfg.MODEL.NAME,
                    " [%s]" % label if label else "", sum(p.numel() for p in model.parameters()) / 1e6,
                    model.num_tokens, model.feat_dim, cfg.SOLVER.AMP)
        for line in step.describe() if step is not None else []:
            logger.info("%s", line)
        progress, first = USLProgress(), 0
        if resuming:
            first = restore_progress(resume_ckpt, plan, progress)
            model.load_state_dict(resume_ckpt["model"])
            dropped = trim_usl_metrics(metrics_path, plan[first].index, progress.epoch - 1,
                                       progress.iteration > 0) if ctx.is_main else 0
            logger.info("resumed from %s: %s epoch %d done%s, global step %d%s", resume_path, plan[first].name,
                        progress.epoch - 1, ", +%d iterations" % progress.iteration if progress.iteration else "",
                        progress.global_step,
                        "; dropped %d metrics.jsonl records written after it" % dropped if dropped else "")
        elif start_from and plan[0].start == "model":
            load_weights(model, start_from, "--from")
        if ctx.is_main:
            save_text(os.path.join(run_dir, CONFIG_FILE), cfg.dump())
        if cfg.SOLVER.EVAL_BEFORE_TRAIN and not resuming:
            if ctx.is_main:
                evaluate(model, splits, cfg, ctx.device, "untrained", -1, -1, logger, tb, metrics_path, 0)
            barrier(ctx)
        # best.pth holds the model of the last stage that selects one (none: a camera-local run alone)
        last_selecting = max((i for i, s in enumerate(plan) if s.best_metric), default=None)

        # --- the stages
        with GracefulStop() as stop:
            for position in range(first, len(plan)):
                stage = plan[position]
                progress.stage = position
                inside = resuming and position == first
                if inside and progress.epoch >= stage.epochs:
                    continue  # the checkpoint closed this stage
                step_now = step if stage.kind == "stage2" else None
                if not inside:
                    if stage.start == "stage1":
                        load_weights(model, start_from or os.path.join(run_dir, stage_best_file("stage1")),
                                     "%s starts from stage 1's model" % stage.name)
                    elif cfg.USL.CALIBRATE_BN and not start_from:
                        logger.info("%s: BatchNorm statistics estimated from the training images (%d batches)",
                                    stage.name, calibrate_batchnorm(model, listings, cfg, ctx.device,
                                                                    cfg.USL.EXTRACT_BATCH))
                    progress.epoch, progress.iteration = 0, 0
                optimizer, schedule = build_optimizer(model, step_now, stage, cfg)
                selection = new_selection(cfg) if stage.kind == "camera" else None
                epoch_state, rng_after_skip = None, None
                if inside:
                    optimizer.load_state_dict(resume_ckpt["optimizer"])
                    schedule.load_state_dict(resume_ckpt["scheduler"])
                    if resume_ckpt.get("scaler"):
                        amp.scaler.load_state_dict(resume_ckpt["scaler"])
                    usl = resume_ckpt["usl"]
                    if selection is not None and usl["selection"] is not None:
                        selection.load_state_dict(usl["selection"])
                    if step_now is not None:
                        step_now.load_state_dict(usl["step"])
                    if progress.iteration:
                        epoch_state = EpochLabels.from_state_dict(usl["epoch_state"], cfg, ctx.device)
                        rng_after_skip = resume_ckpt["rng"]
                elif step_now is not None:
                    step_now.start(model)
                if stage.kind == "stage2" and cfg.USL.CAMERA_PRUNING and not progress.camera_local:
                    progress.camera_local = load_camera_local(cfg.USL.CAMERA_LOCAL_DIR or run_dir, range(6))
                datasets = stage_datasets(stage, labeller)
                logger.info("%s: %d epochs x %d iterations, lr %.2e (cosine T_max %d, floor %.1e), DBSCAN eps %g%s",
                            stage.name, stage.epochs, stage.iters, stage.lr, stage.t_max, stage.eta_min, stage.eps,
                            ", %s camera %d alone" % ("infrared" if stage.modality else "visible", stage.camera)
                            if stage.kind == "camera" else "")

                def checkpoint(completed_epoch, labelled=None):
                    state = make_state(model, optimizer, schedule, amp, cfg, progress, plan, completed_epoch, ctx,
                                       start_from, selection, None if labelled is None else labelled.state_dict(),
                                       step_now.state_dict() if step_now is not None else None)
                    save_last(state, run_dir, progress)

                for epoch in range(progress.epoch, stage.epochs):
                    progress.epoch = epoch
                    if any_across_ranks(ctx, [stop.requested])[0]:
                        if ctx.is_main:
                            checkpoint(epoch - 1, epoch_state)  # a resumed epoch keeps its state
                        logger.warning("stopped by signal %d before %s epoch %d; resumable checkpoint %s",
                                       stop.signum, stage.name, epoch, progress.last_saved)
                        barrier(ctx)
                        return stop.exit_code
                    if epoch_state is not None:
                        labelled, epoch_state = epoch_state, None
                    else:
                        seed_labelling(cfg.SEED, stage.index, epoch)
                        labelled, stats = labeller(stage, model, epoch, selection, progress.camera_local)
                        if ctx.is_main:
                            report(stats, stage, epoch, logger, tb, metrics_path, progress.global_step)
                        seed_iterations(cfg.SEED, stage.index, epoch, ctx.rank)
                    schedule.step(epoch)
                    loaders = epoch_loaders(stage, datasets, labelled, cfg, ctx, epoch)
                    means, speed, stopped = train_epoch(stage, train_model, model, loaders, datasets, labelled,
                                                        step_now, optimizer, amp, cfg, ctx, progress, stop, logger,
                                                        tb, rng_after_skip)
                    rng_after_skip = None
                    if stopped:
                        if ctx.is_main:
                            checkpoint(epoch - 1, labelled)
                            logger.warning("stopped by signal %d in %s epoch %d after %d iterations; resume with "
                                           "--resume (checkpoint %s)", stop.signum, stage.name, epoch,
                                           progress.iteration, progress.last_saved)
                        barrier(ctx)
                        return stop.exit_code
                    progress.iteration = 0
                    logger.info("%s epoch %d done: %s; lr %.2e; %.1f img/s", stage.name, epoch,
                                " ".join("%s %.4f" % kv for kv in means.items()), schedule.lr_at(epoch), speed)
                    last_epoch = epoch == stage.epochs - 1
                    if last_epoch and stage.kind == "camera":
                        listing = labeller.camera_listing(stage)
                        kept = selection.labels if selection.labels is not None else [-1] * len(listing)
                        progress.camera_local[stage.camera] = (torch.from_numpy(listing.rows.copy()),
                                                               torch.as_tensor(kept, dtype=torch.int64))
                    if ctx.is_main:
                        check_finite_state(model.state_dict(), epoch, progress.last_saved)
                        # the model this stage evaluates and selects (CMAG: optionally its EMA teacher)
                        chosen = step_now.evaluation_model(model) if step_now is not None else model
                        records = evaluate(chosen, splits, cfg, ctx.device, stage.name, stage.index, epoch, logger,
                                           tb, metrics_path, progress.global_step,
                                           "ema" if chosen is not model else "encoder") \
                            if evaluation_due(cfg, stage, epoch) else {}
                        if stage.best_metric and update_best(cfg, progress.best, stage, records, epoch):
                            best = progress.best[stage.name]
                            save_model(os.path.join(run_dir, stage_best_file(stage.name)), chosen, cfg, stage.name,
                                       epoch, best)
                            if position == last_selecting:
                                save_model(os.path.join(run_dir, BEST), chosen, cfg, stage.name, epoch, best)
                            if best["value"] is not None:
                                logger.info("new best %s %s %.2f%% at epoch %d (selected on the %s set) -> %s",
                                            stage.name, stage.best_metric, 100 * best["value"], epoch,
                                            cfg.SOLVER.SELECT_BY.upper(), stage_best_file(stage.name))
                        if last_epoch and stage.kind == "camera":
                            save_camera_local(os.path.join(run_dir, camera_local_file(stage.camera)), stage.camera,
                                              labeller.camera_listing(stage), progress.camera_local[stage.camera][1],
                                              selection)
                            if selection.labels is None:
                                logger.warning("%s: no epoch from %d on had a positive silhouette; camera %d's images "
                                               "are not pruned in stage 2", stage.name, selection.first_epoch,
                                               stage.camera)
                            else:
                                logger.info("%s: kept the clustering of epoch %d (silhouette %.4f) -> %s", stage.name,
                                            selection.best_epoch, selection.best_score,
                                            camera_local_file(stage.camera))
                        checkpoint(epoch)
                        tb.flush()
                    barrier(ctx)
        for stage in plan:
            best = progress.best.get(stage.name)
            if best is not None:
                logger.info("finished %s: selected epoch %d%s (%s)", stage.name, best["epoch"],
                            " with %s %.2f%%" % (best["metric"], 100 * best["value"]) if best["value"] is not None
                            else "", stage_best_file(stage.name))
        if last_selecting is not None:
            logger.info("best.pth = the %s model; last.pth = the end of the run", plan[last_selecting].name)
        return 0


def main(argv=None):
    """Train; returns the exit code (0, or 128 + signal after a graceful stop)."""
    args = parse_args(argv)
    cfg, resume_ckpt, resume_path, notes = resolve_run_config(args)
    plan = run_plan(cfg, check_arguments(args, cfg, resume_ckpt, resume_path))
    ctx = init_distributed(cfg.DEVICE)
    try:
        check_usl_config(cfg, ctx)
        return train(cfg, args, ctx, resume_ckpt, resume_path, plan, notes)
    finally:
        cleanup(ctx)


if __name__ == "__main__":
    sys.exit(run_cli(main))
