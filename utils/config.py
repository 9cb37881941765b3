"""Configuration: every default of the project, one comment per key.

The defaults reproduce the released CMFN recipe on SYSU-MM01 (spec ``training_recipe.md``).
Per-dataset YAML files in ``configs/`` override them; a YAML file may name a parent with
``_BASE_: other.yaml`` (resolved relative to the file), as in fast-reid. On the command line,
``--dataset NAME`` picks ``configs/NAME.yaml``, ``--config FILE`` any file, and trailing
``KEY VALUE`` pairs override single keys (``SOLVER.MAX_EPOCHS 2``).

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the source
(file or command line) and the key. Integers are accepted where a float is expected.
"""
import argparse
import ast
import difflib
import os

import yaml
from yacs.config import CfgNode as CN

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(PROJECT_ROOT, "configs")


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


_C = CN()
# Run directory: resolved config, log, metrics.jsonl, tensorboard events, checkpoints.
# Empty means runs/<DATASET.NAME> (plus _trial<N> for RegDB).
_C.OUTPUT_DIR = ""
# Seed for Python, numpy and torch; the sampler and augmentations derive from it per epoch.
_C.SEED = 0
# Deterministic kernels (torch.use_deterministic_algorithms, no cudnn.benchmark); needed for
# bitwise-exact resume. Off reproduces the released cudnn.benchmark=True.
_C.DETERMINISTIC = False
# "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
_C.DEVICE = "auto"

_C.DATASET = CN()
# Registered dataset name: sysu, regdb, llcm, or demo (a synthetic SYSU-layout dataset).
_C.DATASET.NAME = "sysu"
# Dataset root; relative paths are resolved against the current directory.
_C.DATASET.ROOT = "datasets/SYSU-MM01"
# RegDB trial (1..10) whose train/test lists are used; ignored by the other datasets.
_C.DATASET.TRIAL = 1
# Number of training identities held out as a validation split (0 = none, as released).
# Needed when SOLVER.SELECT_BY is "val".
_C.DATASET.VAL_IDS = 0
# demo only: identities generated for training and for testing, and the generator seed.
_C.DATASET.DEMO_TRAIN_IDS = 60
_C.DATASET.DEMO_TEST_IDS = 40
_C.DATASET.DEMO_SEED = 0

_C.INPUT = CN()
# Training crop size [H, W] (released: 384x192 SYSU, 384x144 RegDB/LLCM).
_C.INPUT.SIZE_TRAIN = [384, 192]
# Test resize [H, W]; the released test.py used 144 px for every dataset (spec 6.12).
_C.INPUT.SIZE_TEST = [384, 192]
# ImageNet normalisation.
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
# Zero padding (pixels) before the random crop.
_C.INPUT.PADDING = 10
# Horizontal flip probability.
_C.INPUT.FLIP_PROB = 0.5
# RandomGrayscale probability, applied to both modalities before the crop.
_C.INPUT.GRAYSCALE_PROB = 0.5
# ColorJitter (brightness, contrast, saturation, hue) applied to both modalities before Pad;
# SYSU only in the released recipe. Empty list disables it.
_C.INPUT.COLOR_JITTER = [0.5, 0.5, 0.5, 0.5]
# Random erasing on the normalised tensor (released: p 0.5, area 0.2-0.8 SYSU, 0.02-0.4
# RegDB/LLCM, aspect ratio in [0.3, 1/0.3], fill = the ImageNet mean values, not 0).
_C.INPUT.ERASE_PROB = 0.5
_C.INPUT.ERASE_AREA = [0.2, 0.8]
_C.INPUT.ERASE_RATIO = 0.3
_C.INPUT.ERASE_FILL = [0.485, 0.456, 0.406]
# CAJ channel augmentations (probabilities; 0 disables, the released default).
# ChannelAdapGray on infrared images (probability of the gray branch).
_C.INPUT.CHANNEL_ADAP_GRAY = 0.0
# ChannelExchange(gray=2) on visible images, applied with this probability.
_C.INPUT.CHANNEL_EXCHANGE = 0.0
# ChannelRandomErasing probability (CAJ area 0.02-0.4, fill 0.4914/0.4822/0.4465).
_C.INPUT.CHANNEL_ERASE = 0.0

_C.DATALOADER = CN()
# P: distinct identities per batch.
_C.DATALOADER.NUM_IDS = 6
# K: visible and K infrared images per identity per batch (drawn with replacement).
_C.DATALOADER.NUM_POS = 4
# Training DataLoader workers (0 = load in the main process).
_C.DATALOADER.NUM_WORKERS = 4
# Pinned host memory for faster host-to-GPU copies (ignored on CPU).
_C.DATALOADER.PIN_MEMORY = True
# Keep workers alive across epochs.
_C.DATALOADER.PERSISTENT_WORKERS = True

_C.MODEL = CN()
# Registered model name: cmfn or baseline.
_C.MODEL.NAME = "cmfn"
# resnet50 (released) or resnet18 (fast CPU runs; the other module widths follow).
_C.MODEL.BACKBONE = "resnet50"
# Load ImageNet weights for the backbone.
_C.MODEL.PRETRAINED = True
# Local ImageNet weight file; empty means the torch hub cache (resnet50-19c8e357.pth /
# resnet18-5c106cde.pth or the newer names) and otherwise a clear error.
_C.MODEL.PRETRAIN_PATH = ""
# Stride of the last ResNet stage (1 as released).
_C.MODEL.LAST_STRIDE = 1
# Where MBUE sits: "layer3" (SYSU/LLCM: after MFA3, before layer4) or "layer2" (RegDB: after
# MFA2, before layer3; no MFA3/layer4, features of half the width).
_C.MODEL.MBUE_AFTER = "layer3"
# Dropout applied to the MBUE output (released 0.01).
_C.MODEL.DROPOUT = 0.01
# Per-sample DropPath of the GlobalBlocks (released 0.1).
_C.MODEL.DROP_PATH = 0.1
# GlobalBlock attention heads, window size and cyclic shift.
_C.MODEL.NUM_HEADS = 16
_C.MODEL.WINDOW_SIZE = 8
_C.MODEL.SHIFT_SIZE = 1
# GlobalBlock MLP expansion ratio.
_C.MODEL.MLP_RATIO = 4.0
# Corrected variants of the released quirks (spec section 6); all off = the released model.
_C.MODEL.FIX = CN()
# A proper shifted-window block: attention mask, padding excluded, inverse reshapes.
_C.MODEL.FIX.SWIN = False
# The CSC-CMA context path drawn in the paper figure is active.
_C.MODEL.FIX.CONTEXT_PATH = False
# IRMLP's 3x3 conv is a true depthwise conv.
_C.MODEL.FIX.DEPTHWISE_IRMLP = False
# MBUE branch 1 uses separate compressions for its local and global inputs.
_C.MODEL.FIX.SEPARATE_COMPRESSION = False

_C.LOSS = CN()
# Identity cross-entropy weight and label smoothing (released: 1.0, no smoothing).
_C.LOSS.ID_WEIGHT = 1.0
_C.LOSS.LABEL_SMOOTH = 0.0
# Batch-hard triplet weight and margin.
_C.LOSS.TRI_WEIGHT = 1.0
_C.LOSS.TRI_MARGIN = 0.3
# CPM weight (lambda_1) and margin.
_C.LOSS.CPM_WEIGHT = 0.8
_C.LOSS.CPM_MARGIN = 0.2
# Orthogonality weight (lambda_2).
_C.LOSS.ORT_WEIGHT = 0.01
# DCL weight schedule: DCL_WEIGHTS[i] applies from epoch DCL_MILESTONES[i-1] on
# (released SYSU/LLCM: 0.1 for epochs 0-10, 0.01 for 11-20, 0 from 21).
_C.LOSS.DCL_WEIGHTS = [0.1, 0.01, 0.0]
_C.LOSS.DCL_MILESTONES = [11, 21]

_C.SOLVER = CN()
# Epochs (released: 151, e = 0..150).
_C.SOLVER.MAX_EPOCHS = 151
# Iterations per epoch; 0 = as released, int(N / (P*K)) + 1 with N the larger modality.
_C.SOLVER.ITERS_PER_EPOCH = 0
# SGD with momentum and Nesterov, weight decay on every parameter.
_C.SOLVER.BASE_LR = 0.1
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = True
_C.SOLVER.WEIGHT_DECAY = 5e-4
# Learning-rate factor of everything but the BNNeck and classifier (released 0.1).
_C.SOLVER.BACKBONE_LR_FACTOR = 0.1
# "step" (released) or "cosine" (after the same warm-up, down to 0 at MAX_EPOCHS).
_C.SOLVER.SCHEDULER = "step"
# Linear warm-up epochs: lr * (e + 1) / WARMUP_EPOCHS for e < WARMUP_EPOCHS.
_C.SOLVER.WARMUP_EPOCHS = 10
# Step schedule: multiply by GAMMA at each of these epochs.
_C.SOLVER.STEPS = [20, 80]
_C.SOLVER.GAMMA = 0.1
# Mixed precision: "none" (fp32, released), "bf16" (CPU or GPU) or "fp16" (GPU, GradScaler).
_C.SOLVER.AMP = "none"
# channels_last memory format for the model and the inputs.
_C.SOLVER.CHANNELS_LAST = False
# torch.compile the model.
_C.SOLVER.COMPILE = False
# torch.compile backend: "inductor" (generates fused kernels) or "aot_eager" (traces the
# forward and backward graphs without code generation; for checking that a model compiles).
_C.SOLVER.COMPILE_BACKEND = "inductor"
# SyncBatchNorm across DDP processes (GPU only).
_C.SOLVER.SYNC_BN = False
# Evaluate every this many epochs (released: every epoch from epoch 1 on).
_C.SOLVER.EVAL_PERIOD = 1
# First epoch evaluated (released: 1).
_C.SOLVER.EVAL_START = 1
# Evaluate the untrained model before the first epoch (step -1 in metrics.jsonl).
_C.SOLVER.EVAL_BEFORE_TRAIN = False
# Metric that picks best.pth: rank1, mAP or mINP.
_C.SOLVER.BEST_METRIC = "rank1"
# What best.pth is selected on: "test" (released: the test set, trial 0), "val" (held-out
# training identities, needs DATASET.VAL_IDS) or "last" (no selection; best = last).
_C.SOLVER.SELECT_BY = "test"
# Log a progress line every this many iterations.
_C.SOLVER.LOG_PERIOD = 50

_C.TEST = CN()
# SYSU search mode: "all" (RGB cams 1,2,4,5) or "indoor" (cams 1,2).
_C.TEST.MODE = "all"
# Retrieval direction, query modality to gallery modality: "ir2vis" or "vis2ir".
_C.TEST.DIRECTION = "ir2vis"
# Gallery sampling: "seeded" (released: random.seed(trial), random.choice per (id, cam)) or
# "official" (SYSU exp/rand_perm_cam.mat).
_C.TEST.GALLERY = "seeded"
# Gallery images per (id, camera): 1 (single-shot) or 10 (multi-shot).
_C.TEST.SHOTS = 1
# Number of gallery trials (SYSU, LLCM) averaged in the report.
_C.TEST.NUM_TRIALS = 10
# Horizontal-flip test-time augmentation, and how the two L2-normalised outputs combine:
# "sum" (released, not renormalised) or "mean" (averaged and L2-normalised again, as CAJ).
_C.TEST.FLIP = True
_C.TEST.FLIP_MODE = "sum"
# Embedding used for ranking: "sum6" (released: sum of the 6 similarities), "mix" (0.1 pool +
# 0.9 BN), "orig" (original copy, pool + BN), "pool" (3 pool), "bn" (3 BN).
_C.TEST.FEATURE = "sum6"
# Distance: "cosine" (negative inner product of the normalised features, released) or
# "euclidean".
_C.TEST.DISTANCE = "cosine"
# k-reciprocal re-ranking (off as released) and its parameters.
_C.TEST.RERANK = False
_C.TEST.RERANK_K1 = 20
_C.TEST.RERANK_K2 = 6
_C.TEST.RERANK_LAMBDA = 0.3
# Expansion rule of re-ranking: "released" (the re-ranking authors' code, whose numbers papers
# report) or "paper" (the ">= 2/3" overlap test as written in the paper).
_C.TEST.RERANK_EXPANSION = "released"
# Images per batch during feature extraction.
_C.TEST.BATCH_SIZE = 64
# Feature-extraction workers.
_C.TEST.NUM_WORKERS = 2
# Autocast dtype for feature extraction: "none" or "bf16".
_C.TEST.AMP = "none"
# CMC length.
_C.TEST.MAX_RANK = 20


def get_default_config():
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def _suggest(key, choices):
    close = difflib.get_close_matches(key, choices, n=1)
    return " (did you mean %s?)" % close[0] if close else ""


def _coerce(value, default, full_key, source):
    """Return `value` converted to the type of `default`, or raise ConfigError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif default is None:
        return value
    raise ConfigError(
        "%s: %s expects %s, got %r (%s)"
        % (source, full_key, type(default).__name__, value, type(value).__name__)
    )


def _merge_dict(cfg, data, source, prefix=""):
    if not isinstance(data, dict):
        raise ConfigError("%s: expected a mapping at %s, got %r" % (source, prefix or "top level", data))
    for key, value in data.items():
        full_key = prefix + key
        if key not in cfg:
            raise ConfigError(
                "%s: unknown config key %s%s" % (source, full_key, _suggest(key, list(cfg.keys())))
            )
        if isinstance(cfg[key], CN):
            _merge_dict(cfg[key], value, source, full_key + ".")
        else:
            cfg[key] = _coerce(value, cfg[key], full_key, source)


def merge_from_file(cfg, path, _seen=()):
    """Merge a YAML file (and its ``_BASE_`` chain, parents first) into `cfg`."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError("%s: _BASE_ cycle through %s" % (path, " -> ".join(_seen)))
    if not os.path.isfile(path):
        raise ConfigError("config file not found: %s" % path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("%s: not valid YAML: %s" % (path, exc)) from None
    base = data.pop("_BASE_", None)
    if base:
        merge_from_file(cfg, os.path.join(os.path.dirname(path), base), _seen + (path,))
    _merge_dict(cfg, data, path)
    return cfg


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_from_list(cfg, opts, source="command line"):
    """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` overrides into `cfg`."""
    if len(opts) % 2:
        raise ConfigError("%s: overrides must be KEY VALUE pairs, got %r" % (source, opts))
    for full_key, text in zip(opts[0::2], opts[1::2]):
        node, parts = cfg, full_key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CN):
                raise ConfigError("%s: unknown config key %s" % (source, full_key))
            node = node[part]
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], CN):
            raise ConfigError(
                "%s: unknown config key %s%s" % (source, full_key, _suggest(leaf, list(node.keys())))
            )
        value = _parse_value(text)
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = text
        node[leaf] = _coerce(value, node[leaf], full_key, source)
    return cfg


def dataset_config_path(name):
    """configs/<name>.yaml, or a ConfigError listing the available names."""
    path = os.path.join(CONFIG_DIR, name + ".yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise ConfigError("no config for dataset %r (expected %s); available: %s" % (name, path, ", ".join(names)))
    return path


def add_config_arguments(parser):
    """The config options shared by train.py, test.py and the tools."""
    parser.add_argument("--dataset", help="use configs/DATASET.yaml (sysu, regdb, llcm, demo)")
    parser.add_argument("--config", help="a YAML config file (merged after --dataset)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. SOLVER.MAX_EPOCHS 2")
    return parser


def build_config(dataset=None, config_file=None, opts=(), freeze=True):
    """Defaults <- configs/<dataset>.yaml <- config_file <- opts."""
    cfg = get_default_config()
    if dataset:
        merge_from_file(cfg, dataset_config_path(dataset))
    if config_file:
        merge_from_file(cfg, config_file)
    merge_from_list(cfg, list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def config_from_args(args, extra_opts=(), freeze=True):
    """Build the config from parsed :func:`add_config_arguments` options.

    `extra_opts` (KEY VALUE pairs from script-specific flags such as ``--mode``) are applied
    before the trailing command-line overrides.
    """
    if not args.dataset and not args.config:
        args.dataset = "sysu"
    return build_config(args.dataset, args.config, list(extra_opts) + list(args.opts or []), freeze)


def config_from_string(text, source="checkpoint"):
    """Rebuild a config from the YAML text stored in a checkpoint or run directory."""
    cfg = get_default_config()
    _merge_dict(cfg, yaml.safe_load(text) or {}, source)
    return cfg


def default_output_dir(cfg):
    """runs/<dataset>[_trial<N>] when OUTPUT_DIR is empty."""
    if cfg.OUTPUT_DIR:
        return cfg.OUTPUT_DIR
    name = cfg.DATASET.NAME
    if name == "regdb":
        name += "_trial%d" % cfg.DATASET.TRIAL
    return os.path.join("runs", name)
