"""The config of a run: a fresh one, or the one of the checkpoint being resumed.

:func:`resolve_run_config` builds the config from the command line (or, for ``--resume``
without ``--method``/``--dataset``/``--config``, from the checkpoint's own config plus the
overrides), resolves OUTPUT_DIR and loads the checkpoint to resume; a resumed config that
differs from the checkpoint's is reported key by key. :func:`check_run_config` rejects
combinations that would only fail later, deep inside the run.
"""
import os

from engine.checkpoint import CheckpointError, load_checkpoint
from engine.run_dir import LAST_CHECKPOINT
from engine.training import MixedPrecision
from utils.config import (add_config_arguments, config_from_args, config_from_string, default_output_dir,
                          is_config_key, merge_from_list, validate_config)
from utils.errors import ConfigError


def add_run_arguments(parser):
    """The options every training entry point takes: --resume [PATH], --overwrite and the
    config arguments (--method, --dataset, --config, trailing KEY VALUE pairs)."""
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue a run from checkpoint PATH (default: OUTPUT_DIR/last.pth); without "
                             "--method/--dataset/--config the checkpoint's own config is used (overrides still apply)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that already holds a run (deletes its files)")
    add_config_arguments(parser)


def parse_run_arguments(parser, argv=None):
    """Parse `argv` (default sys.argv) with `parser` (:func:`add_run_arguments`); in "--resume
    KEY VALUE" the key is an override, not the checkpoint (a config key is never a path)."""
    args = parser.parse_intermixed_args(argv)
    if args.resume and not os.path.exists(args.resume) and is_config_key(args.resume):
        args.opts.insert(0, args.resume)
        args.resume = ""
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


def resolve_run_config(args):
    """(frozen cfg, resume checkpoint or None, resume path or None, notes for the log)."""
    notes = []
    ckpt = None
    own_config = args.resume and not (args.method or args.dataset or args.config)
    if own_config:
        ckpt = load_checkpoint(args.resume)
        cfg = config_from_string(ckpt["config"], source=args.resume)
        merge_from_list(cfg, args.opts)
        validate_config(cfg)
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


def check_run_config(cfg, ctx):
    """Clear errors for combinations of settings and machine that would fail later."""
    solver = cfg.SOLVER
    if solver.SELECT_BY == "val" and cfg.DATASET.VAL_IDS <= 0:
        raise ConfigError("SOLVER.SELECT_BY val needs held-out identities: set DATASET.VAL_IDS > 0")
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
