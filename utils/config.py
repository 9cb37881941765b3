"""Configuration: every default of the project, one comment per key.

The defaults reproduce the released CMFN recipe on SYSU-MM01.
Each method has one preset per dataset, ``configs/<method>/<dataset>.yaml``; a YAML file may
name a parent with ``_BASE_: other.yaml`` (resolved relative to the file), as in fast-reid. On
the command line ``--method NAME`` (default cmfn) and ``--dataset NAME`` pick a preset,
``--config FILE`` any file, and trailing ``KEY VALUE`` pairs override single keys
(``SOLVER.MAX_EPOCHS 2``). Method-specific keys live in their own nodes (``MODEL.CMFN.*``,
``LOSS.IVREID.*``); names from before that layout are read through :data:`RENAMES`.

Unknown keys, values of the wrong type and enumerated values outside their choices (checked
by :func:`validate_config` when the config is built) raise :class:`ConfigError` naming the
source (file or command line) and the key. Integers are accepted where a float is expected.
"""
import argparse
import ast
import difflib
import os

import yaml
from yacs.config import CfgNode as CN

from utils.errors import ConfigError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(PROJECT_ROOT, "configs")


_C = CN()
# Schema version of this config. Files without it are version 1 (CMFN keys at the root of
# MODEL and LOSS); their keys are renamed on load (RENAMES).
_C.CONFIG_VERSION = 2
# Method preset the run was built from (configs/<METHOD>/<dataset>.yaml): cmfn, ivreid. It
# names the run directory (runs/<dataset> for cmfn, runs/<METHOD>_<dataset> otherwise).
_C.METHOD = "cmfn"
# Run directory: resolved config, log, metrics.jsonl, tensorboard events, checkpoints.
# Empty means runs/[<METHOD>_]<run name of the dataset> (RegDB: regdb_trial<N>).
_C.OUTPUT_DIR = ""
# Seed for Python, numpy and torch; the sampler and augmentations derive from it per epoch.
_C.SEED = 0
# Deterministic kernels (torch.use_deterministic_algorithms, no cudnn.benchmark); needed for
# bitwise-exact resume. Off reproduces the released cudnn.benchmark=True.
_C.DETERMINISTIC = False
# "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
_C.DEVICE = "auto"

_C.DATASET = CN()
# Registered dataset name: sysu, regdb, llcm, demo (a synthetic SYSU-layout dataset),
# market1501, dukemtmc, msmt17, or demo_market (a synthetic Market-1501-layout dataset).
_C.DATASET.NAME = "sysu"
# Dataset root; relative paths are resolved against the current directory.
_C.DATASET.ROOT = "datasets/SYSU-MM01"
# RegDB trial (1..10) whose train/test lists are used; ignored by the other datasets.
_C.DATASET.TRIAL = 1
# Market-1501 / DukeMTMC-reID training labels: "set" (released: CPython set order of the pids
# met in sorted file order; a bijection, not ascending for Duke) or "sorted" (rank of the pid).
_C.DATASET.RELABEL = "set"
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
# Test resize [H, W] (the released CMFN test.py resized every dataset to 384x144).
# Filter of every resize (training arrays, test images): "lanczos" (released CMFN),
# "bilinear" (PIL's antialiased bilinear, torchvision's Resize default; released IV-REID) or
# "bicubic" (released FusionReID's training images). SYSU keeps one set of training arrays per
# filter.
_C.INPUT.RESIZE_FILTER = "lanczos"
# Filter of the test images when it differs from RESIZE_FILTER (released FusionReID: bicubic
# for training, bilinear for testing); empty means RESIZE_FILTER.
_C.INPUT.TEST_RESIZE_FILTER = ""
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
# How the erased box is drawn: "zhong" (the released CMFN/CAJ code: aspect ratio uniform in
# [ERASE_RATIO, 1/ERASE_RATIO], up to 100 attempts, ERASE_FILL) or "torchvision" (torchvision's
# RandomErasing(value="random") as released FusionReID: log-uniform aspect ratio, up to 10
# attempts, per-pixel N(0, 1) noise; ERASE_FILL unused).
_C.INPUT.ERASE_STYLE = "zhong"
# CAJ channel augmentations (probabilities; 0 disables, the released default).
# ChannelAdapGray on infrared images (probability of the gray branch).
_C.INPUT.CHANNEL_ADAP_GRAY = 0.0
# ChannelExchange(gray=2) on visible images, applied with this probability.
_C.INPUT.CHANNEL_EXCHANGE = 0.0
# ChannelRandomErasing probability (CAJ area 0.02-0.4, fill 0.4914/0.4822/0.4465).
_C.INPUT.CHANNEL_ERASE = 0.0

_C.DATALOADER = CN()
# Registered training sampler (data/samplers/registry.py): "cross_modality" (CMFN: P ids x
# K visible + K infrared drawn with replacement, position-aligned pairs), "balanced" (IV-REID:
# P ids x K (infrared, visible) pairs without replacement, the epoch ends with the ids), "pk"
# (single-modality ReID: P ids x K images).
_C.DATALOADER.SAMPLER = "cross_modality"
# balanced only: "seeded" (each epoch's order from (SEED, epoch)) or "reference" (the
# released IV-REID order: one Python/numpy random stream seeded with SEED, continued across
# epochs).
_C.DATALOADER.BALANCED_ORDER = "seeded"
# P: distinct identities per batch.
_C.DATALOADER.NUM_IDS = 6
# K: images per identity and modality per batch.
_C.DATALOADER.NUM_POS = 4
# Training DataLoader workers (0 = load in the main process).
_C.DATALOADER.NUM_WORKERS = 4
# Pinned host memory for faster host-to-GPU copies (ignored on CPU).
_C.DATALOADER.PIN_MEMORY = True
# Keep workers alive across epochs.
_C.DATALOADER.PERSISTENT_WORKERS = True

_C.MODEL = CN()
# Registered model name (model/registry.py): cmfn, baseline (CMFN without its modules),
# ivreid, fusionreid, fusionreid_vi, tokenmatcher.
_C.MODEL.NAME = "cmfn"
# resnet50 (released) or resnet18 (fast CPU runs; the other module widths follow).
_C.MODEL.BACKBONE = "resnet50"
# Load ImageNet weights for the backbone.
_C.MODEL.PRETRAINED = True
# Local ImageNet weight file; empty means the torch hub cache (resnet50-19c8e357.pth /
# resnet18-5c106cde.pth or the newer names), downloaded there when missing (MODEL.DOWNLOAD).
_C.MODEL.PRETRAIN_PATH = ""
# With PRETRAINED and no weight file in PRETRAIN_PATH or the hub cache, download torchvision's
# file (SHA-256 prefix checked) into the hub cache; False never downloads (offline machines).
_C.MODEL.DOWNLOAD = True
# Stride of the last ResNet stage (1 as released by every hosted method).
_C.MODEL.LAST_STRIDE = 1

# CMFN (and its baseline): where MBUE sits and the MBUE block sizes.
_C.MODEL.CMFN = CN()
# "layer3" (SYSU/LLCM: after MFA3, before layer4) or "layer2" (RegDB: after MFA2, before
# layer3; no MFA3/layer4, features of half the width).
_C.MODEL.CMFN.MBUE_AFTER = "layer3"
# Dropout applied to the MBUE output (released 0.01).
_C.MODEL.CMFN.DROPOUT = 0.01
# Per-sample DropPath of the GlobalBlocks (released 0.1).
_C.MODEL.CMFN.DROP_PATH = 0.1
# GlobalBlock attention heads, window size and cyclic shift.
_C.MODEL.CMFN.NUM_HEADS = 16
_C.MODEL.CMFN.WINDOW_SIZE = 8
_C.MODEL.CMFN.SHIFT_SIZE = 1
# GlobalBlock MLP expansion ratio.
_C.MODEL.CMFN.MLP_RATIO = 4.0
# Corrected variants of the released quirks (docs/cmfn.md); all off = the released model.
_C.MODEL.CMFN.FIX = CN()
# A proper shifted-window block: attention mask, padding excluded, inverse reshapes.
_C.MODEL.CMFN.FIX.SWIN = False
# The CSC-CMA context path drawn in the paper figure is active.
_C.MODEL.CMFN.FIX.CONTEXT_PATH = False
# IRMLP's 3x3 conv is a true depthwise conv.
_C.MODEL.CMFN.FIX.DEPTHWISE_IRMLP = False
# MBUE branch 1 uses separate compressions for its local and global inputs.
_C.MODEL.CMFN.FIX.SEPARATE_COMPRESSION = False

# IV-REID: single-stream ResNet, BNNeck, two auxiliary modality classifiers.
_C.MODEL.IVREID = CN()
# Every backbone conv carries a bias, as released (dead in train mode: each conv is followed
# by a BatchNorm; in eval mode the biases act through the BN running means). False builds
# bias-free convs (the converter folds released biases into the BN running means).
_C.MODEL.IVREID.CONV_BIAS = True
# ReLU after the stem BatchNorm (False as released: the stem goes conv -> BN -> max-pool).
_C.MODEL.IVREID.STEM_RELU = False
# Width of the hidden linear layer of each auxiliary modality classifier (released 512).
_C.MODEL.IVREID.AUX_DIM = 512
# Learning-rate factor of the two auxiliary classifiers (released: 10 x BASE_LR).
_C.MODEL.IVREID.AUX_LR_FACTOR = 10.0

# FusionReID: ResNet-50 (TransReID stem) + overlapping-patch ViT-B/16, fused by the LRUs and the
# HTM; six BNNeck heads. Defaults are the released values.
_C.MODEL.FUSIONREID = CN()
# Rows of the ViT camera table (SIE): the training cameras (Market 6, Duke 8, MSMT17 15); 0 or 1
# builds no table. Test images use their own camera's row.
_C.MODEL.FUSIONREID.NUM_CAMERAS = 0
# Camera side information on (only with NUM_CAMERAS > 1) and its coefficient (released 3.0).
_C.MODEL.FUSIONREID.SIE_CAMERA = True
_C.MODEL.FUSIONREID.SIE_COE = 3.0
# ViT patch kernel and stride (12: overlapping patches, a 21x10 grid at 256x128).
_C.MODEL.FUSIONREID.PATCH_SIZE = 16
_C.MODEL.FUSIONREID.STRIDE_SIZE = 12
# ViT width, depth and heads (ViT-B: 768, 12, 12; small values for CPU demos).
_C.MODEL.FUSIONREID.VIT_EMBED_DIM = 768
_C.MODEL.FUSIONREID.VIT_DEPTH = 12
_C.MODEL.FUSIONREID.VIT_NUM_HEADS = 12
# ViT stochastic depth, rising linearly from 0 to this value over the blocks.
_C.MODEL.FUSIONREID.DROP_PATH = 0.1
# ViT ImageNet file (timm layout, e.g. jx_vit_base_p16_224-80ecf9dd.pth); empty looks in the
# torch hub cache. Never downloaded. Read with MODEL.PRETRAINED (the ResNet uses PRETRAIN_PATH).
_C.MODEL.FUSIONREID.VIT_PRETRAIN_PATH = ""
# Put back the ResNet stem ReLU and 3x3/2 max-pool (False as released: no ReLU, 2x2 max-pool).
_C.MODEL.FUSIONREID.STANDARD_STEM = False
# Width of the LRU outputs and of the HTM (released 768), HTM layers (2) and their heads (12).
_C.MODEL.FUSIONREID.MIX_DIM = 768
_C.MODEL.FUSIONREID.HTM_LAYER = 2
_C.MODEL.FUSIONREID.HTM_NUM_HEADS = 12
# fusionreid_vi only (FusionReID-VI, a project extension, not a reproduction): what the SIE table
# is indexed by ("camera", "modality" or "camera_modality"), whether the CNN stem and the ViT
# patch embedding are shared by the two modalities or one per modality ("shared" or
# "modality"), and the number of the first camera of the VI datasets (1).
_C.MODEL.FUSIONREID.VI_SIE = "camera"
_C.MODEL.FUSIONREID.VI_CNN_STEM = "shared"
_C.MODEL.FUSIONREID.VI_VIT_STEM = "shared"
_C.MODEL.FUSIONREID.VI_CAMERA_BASE = 1

_C.LOSS = CN()
# Registered criterion (loss/registry.py): cmfn (also trains the baseline), ivreid, fusionreid.
_C.LOSS.NAME = "cmfn"
# Identity cross-entropy weight and label smoothing (released: 1.0, no smoothing).
_C.LOSS.ID_WEIGHT = 1.0
_C.LOSS.LABEL_SMOOTH = 0.0
# Batch-hard triplet weight and margin.
_C.LOSS.TRI_WEIGHT = 1.0
_C.LOSS.TRI_MARGIN = 0.3

# CMFN criterion: CPM, orthogonality and the DCL schedule.
_C.LOSS.CMFN = CN()
# CPM weight (lambda_1) and margin.
_C.LOSS.CMFN.CPM_WEIGHT = 0.8
_C.LOSS.CMFN.CPM_MARGIN = 0.2
# Orthogonality weight (lambda_2).
_C.LOSS.CMFN.ORT_WEIGHT = 0.01
# DCL weight schedule: DCL_WEIGHTS[i] applies from epoch DCL_MILESTONES[i-1] on
# (released SYSU/LLCM: 0.1 for epochs 0-10, 0.01 for 11-20, 0 from 21).
_C.LOSS.CMFN.DCL_WEIGHTS = [0.1, 0.01, 0.0]
_C.LOSS.CMFN.DCL_MILESTONES = [11, 21]

# IV-REID criterion: per-modality auxiliary CE and the KL between the two auxiliary heads.
_C.LOSS.IVREID = CN()
# Weight of the CE of each auxiliary head on its own modality's rows (released 1).
_C.LOSS.IVREID.AUX_ID_WEIGHT = 1.0
# Weight of the two KL terms (released 1).
_C.LOSS.IVREID.KL_WEIGHT = 1.0
# KL reduction: "batchmean" (released SYSU: sum / rows) or "mean" (released RegDB: sum /
# (rows x classes), i.e. 1 / num_classes of batchmean).
_C.LOSS.IVREID.KL_REDUCTION = "batchmean"
# Feature the triplet loss sees: "feat" (released: the post-BNNeck feature) or "pool" (the
# pre-BN pooled feature, as in the usual BNNeck recipe).
_C.LOSS.IVREID.TRI_FEATURE = "feat"

# FusionReID criterion: label-smoothed CE (LOSS.LABEL_SMOOTH, 0.1 in its presets) plus the
# batch-hard triplet on each head, summed over the heads.
_C.LOSS.FUSIONREID = CN()
# Heads whose outputs logits_<name> and feat_<name> enter the sum, in the released order:
# the ResNet and ViT backbone heads, the two LRU heads, the two HTM heads.
_C.LOSS.FUSIONREID.HEADS = ["cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit"]
# Soft-margin triplet log(1 + exp(d_ap - d_an)) (released); False uses the hinge with
# LOSS.TRI_MARGIN.
_C.LOSS.FUSIONREID.SOFT_MARGIN = True

_C.SOLVER = CN()
# Epochs (released: 151, e = 0..150).
_C.SOLVER.MAX_EPOCHS = 151
# Iterations per epoch; 0 = as released, int(N / (P*K)) + 1 with N the larger modality.
_C.SOLVER.ITERS_PER_EPOCH = 0
# Registered optimizer (engine/solver.py): "sgd" (CMFN), "adam" (IV-REID), "adamw".
_C.SOLVER.OPTIMIZER = "sgd"
# Learning rate of the full-rate parameter groups; each group the model declares scales it by
# its lr factor.
_C.SOLVER.BASE_LR = 0.1
# SGD momentum and Nesterov.
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = True
# Adam / AdamW betas and epsilon.
_C.SOLVER.BETAS = [0.9, 0.999]
_C.SOLVER.EPS = 1e-8
# Weight decay on every trainable parameter (coupled L2 for SGD and Adam, decoupled for AdamW).
_C.SOLVER.WEIGHT_DECAY = 5e-4
# Update every tensor of the optimizer in one fused kernel (torch's fused SGD / Adam / AdamW)
# instead of torch's default (a loop over the tensors on the CPU, grouped kernels on CUDA): the
# same update, rounded differently in the last bit here and there (about 1e-7 relative).
# False = torch's default, as the released code runs.
_C.SOLVER.FUSED = True
# Learning-rate factor of the backbone groups (CMFN: everything but the BNNeck and the
# classifier, released 0.1; IV-REID: backbone, BNNeck and classifier, released 1).
_C.SOLVER.BACKBONE_LR_FACTOR = 0.1
# Registered schedule: "step" (warm-up, then GAMMA at each of STEPS; released CMFN), "cosine"
# (after the same warm-up, down to 0 at MAX_EPOCHS), "constant" (after the warm-up) or
# "warmup_cosine" (released FusionReID: from WARMUP_LR_INIT up to the group's lr, then a cosine
# down to MIN_LR; formula in engine/solver.py).
_C.SOLVER.SCHEDULER = "step"
# When the schedule is evaluated: "epoch" (once at the start of each epoch, as released) or
# "iteration" (before every step, at the fractional epoch e + i / iterations).
_C.SOLVER.SCHEDULE_UNIT = "epoch"
# Linear warm-up epochs: lr * (e + 1) / WARMUP_EPOCHS for e < WARMUP_EPOCHS (per iteration:
# (t + 1 / iterations) / WARMUP_EPOCHS at fractional epoch t).
_C.SOLVER.WARMUP_EPOCHS = 10
# warmup_cosine only (timm's CosineLRScheduler as FusionReID uses it): the absolute lr the
# warm-up starts from and the floor of the cosine, the same for every group (released FusionReID
# 0.01 x and 0.002 x BASE_LR = 5e-5 and 1e-5).
_C.SOLVER.WARMUP_LR_INIT = 5e-5
_C.SOLVER.MIN_LR = 1e-5
# Parameters whose name contains "bias": lr factor and weight decay (released FusionReID: 2 and
# 1e-4); only models that declare a bias group (FusionReID) read these.
_C.SOLVER.BIAS_LR_FACTOR = 2.0
_C.SOLVER.WEIGHT_DECAY_BIAS = 1e-4
# Step schedule: multiply by GAMMA at each of these epochs.
_C.SOLVER.STEPS = [20, 80]
_C.SOLVER.GAMMA = 0.1
# Mixed precision: "none" (fp32, released CMFN), "bf16" (CPU or GPU), "fp16" (GPU, GradScaler)
# or "auto" (fp16 with GradScaler on CUDA as released FusionReID, bf16 on CPU).
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
# Gallery sampling: "seeded" (released CMFN: random.seed(seed), random.choice per (id, cam),
# id-major), "official" (SYSU exp/rand_perm_cam.mat) or "seeded_cam_major" (released IV-REID:
# the same draw, camera-major over cams 1, 2, 4, 5, then ids).
_C.TEST.GALLERY = "seeded"
# Seeds of the seeded gallery trials; empty means 0 .. NUM_TRIALS-1 (the common protocol).
# Released IV-REID: 2019 + 33 i.
_C.TEST.TRIAL_SEEDS = []
# Gallery images per (id, camera): 1 (single-shot) or 10 (multi-shot).
_C.TEST.SHOTS = 1
# Number of gallery trials (SYSU, LLCM) averaged in the report.
_C.TEST.NUM_TRIALS = 10
# Horizontal-flip test-time augmentation, and how the two L2-normalised outputs combine:
# "sum" (released, not renormalised) or "mean" (averaged and L2-normalised again, as CAJ);
# "average_raw" averages the model's unnormalised descriptors of the image and of its mirror
# and then L2-normalises (released TokenMatcher / CMAG; models with an ``embed`` method).
_C.TEST.FLIP = True
_C.TEST.FLIP_MODE = "sum"
# Embedding preset used for ranking, one of the model's (``embedding_presets``); empty means
# the model's default. CMFN: "sum6" (released: sum of the 6 similarities, its default), "mix"
# (0.1 pool + 0.9 BN), "orig" (original copy, pool + BN), "pool" (3 pool), "bn" (3 BN).
# IV-REID: "bn" (post-BNNeck, default) or "pool".
_C.TEST.FEATURE = ""
# Distance: "cosine" (negative inner product of the normalised features, released CMFN),
# "euclidean" or "sqeuclidean" (its square; released IV-REID, the same ranking as cosine on
# unit features).
_C.TEST.DISTANCE = "cosine"
# Precision of test.py's distance matrix and re-ranking: "float64" (default; near ties below
# float32 resolution keep their order) or "float32". The in-training evaluation uses float32.
_C.TEST.DISTANCE_DTYPE = "float64"
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

# --- Unsupervised training (train_usl.py): the TokenMatcher encoder and the USL recipe.
# Defaults are the released TokenMatcher SYSU-MM01 recipe; configs/tokenmatcher/*.yaml hold
# the presets (RegDB values there).
# The TokenMatcher / CMAG encoder: a ViT with K class tokens and one conv stem per modality;
# its input size is INPUT.SIZE_TRAIN (= INPUT.SIZE_TEST, released 384x128).
_C.MODEL.TOKENMATCHER = CN()
# K, the class tokens (released 4 on SYSU, 6 on RegDB); the descriptor has K * EMBED_DIM values.
_C.MODEL.TOKENMATCHER.NUM_TOKENS = 4
# Token width E (768), number of blocks D (12, the last one run as a copy), attention heads (12)
# and MLP expansion ratio (4.0) of the ViT-B/16 layout.
_C.MODEL.TOKENMATCHER.EMBED_DIM = 768
_C.MODEL.TOKENMATCHER.DEPTH = 12
_C.MODEL.TOKENMATCHER.NUM_HEADS = 12
_C.MODEL.TOKENMATCHER.MLP_RATIO = 4.0
# Channels of the conv stems (64) and the patch size they stand in for (16: a 24x8 grid at 384x128).
_C.MODEL.TOKENMATCHER.STEM_WIDTH = 64
_C.MODEL.TOKENMATCHER.PATCH_SIZE = 16
# Stochastic depth of the last block (linearly increasing over the blocks; released 0.3).
_C.MODEL.TOKENMATCHER.DROP_PATH = 0.3
# Ghost BatchNorm groups in training: the released 4-GPU DataParallel normalises each quarter of
# the batch on its own (4); 1 normalises the whole batch (use 1 when DDP already splits it).
_C.MODEL.TOKENMATCHER.GHOST_BATCHES = 4
# Height / width ratio of the pretraining grid the TransReID-SSL position embedding is resized
# from (released 2: 16x8 patches of a 256x128 input).
_C.MODEL.TOKENMATCHER.PRETRAIN_HW_RATIO = 2

_C.USL = CN()
# Training-image pipelines per stage (data/usl_transforms.py).
_C.USL.INPUT = CN()
# Crop size [H, W] of the training views and of the clustering-time extraction; must equal
# INPUT.SIZE_TRAIN (released 384x128).
_C.USL.INPUT.SIZE = [384, 128]
# Resize filter of the training views: "bicubic" (released SYSU) or "bilinear" (released RegDB).
_C.USL.INPUT.RESIZE_FILTER = "bicubic"
# Step order of stage 1, the camera-local runs and stage 2: "jitter_view2" (colour jitter on RGB
# view 2 only, after the crop; released SYSU stage 1) or "jitter_first" (jitter first on every
# view, IR included; released SYSU camera-local runs and stage 2, RegDB both stages).
_C.USL.INPUT.LAYOUT_STAGE1 = "jitter_view2"
_C.USL.INPUT.LAYOUT_CAMERA = "jitter_first"
_C.USL.INPUT.LAYOUT_STAGE2 = "jitter_first"
# Zero padding before the random crop (10) and horizontal-flip probability (0.5).
_C.USL.INPUT.PADDING = 10
_C.USL.INPUT.FLIP_PROB = 0.5
# ColorJitter brightness, contrast, saturation, hue (released 0.5 each).
_C.USL.INPUT.COLOR_JITTER = [0.5, 0.5, 0.5, 0.5]
# ChannelRandomErasing probability (0.5), ChannelAdapGray probability on IR (0.5) and the
# ChannelExchange bound of RGB view 2 (gray=2: always a single channel, as released).
_C.USL.INPUT.ERASE_PROB = 0.5
_C.USL.INPUT.ADAP_GRAY_PROB = 0.5
_C.USL.INPUT.EXCHANGE_GRAY = 2
# IR images per batch (128); the RGB loader takes half as many images, each as two views, so both
# modalities give BATCH_SIZE rows. The camera-local runs take BATCH_SIZE images of one view.
_C.USL.BATCH_SIZE = 128
# Images per pseudo label in a batch: an anchor and NUM_INSTANCES - 1 of other cameras (16).
_C.USL.NUM_INSTANCES = 16
# Sampler draws: "seeded" (each pass from (SEED, stage, epoch)) or "reference" (the released
# generators, seeded per epoch).
_C.USL.SAMPLER_ORDER = "seeded"
# What stage 2's pseudo-labelled list holds in its camera slot: "index" (released SYSU: the
# image's own index, so any other image counts as another camera) or "camera" (released RegDB).
_C.USL.CAMERA_SLOT_STAGE2 = "index"
# Decode and resize every training image once (bicubic, to USL.INPUT.SIZE) instead of per
# sample: faster; exact where the pipeline resizes first, an approximation where the colour
# jitter comes first (off as released).
_C.USL.PRELOAD = False
# Without pretrained weights, start the infrared stem as a copy of the visible one, as loading
# the pretrained file does (it copies its single stem into both); False draws them independently.
_C.USL.SAME_STEM_INIT = True
# Before stage 1 of a run from the built model, estimate every BatchNorm's running statistics
# from the training images (one pass without gradient, clustering-time transform, RGB and IR
# rows together as in training), replacing the fresh 0 / 1 statistics of an encoder without
# pretrained weights, with which the first clustering's descriptors are all nearly parallel
# (off as released).
_C.USL.CALIBRATE_BN = False
# Images per batch of the clustering-time feature extraction (released 256; 64 in the
# camera-local runs, USL.CAMERA.EXTRACT_BATCH).
_C.USL.EXTRACT_BATCH = 256
# Per-epoch clustering: k-reciprocal Jaccard distance and DBSCAN (cluster/).
_C.USL.CLUSTER = CN()
# DBSCAN radius of stages 1 and 2 (released 0.6 SYSU, 0.2 RegDB) and its min_samples (4).
_C.USL.CLUSTER.EPS = 0.6
_C.USL.CLUSTER.MIN_SAMPLES = 4
# k1 and k2 of the k-reciprocal Jaccard distance (30, 6).
_C.USL.CLUSTER.K1 = 30
_C.USL.CLUSTER.K2 = 6
# Nearest-neighbour search: "torch" (exact, CPU or GPU, memory-bounded blocks) or "faiss"
# (IndexFlatL2 as released; needs the faiss package).
_C.USL.CLUSTER.KNN_BACKEND = "torch"
# Bound (MB) on the temporaries of each clustering step.
_C.USL.CLUSTER.MEMORY_MB = 256
# Cluster memories: softmax temperature (0.05) and momentum of the stage-1 memories (released
# 0.2 SYSU, 0.8 RegDB), of stage 2's per-modality memories (0.2, used by the mate loss) and of
# stage 2's mixed cross-modal memories (0.8).
_C.USL.TEMP = 0.05
_C.USL.MOMENTUM = 0.2
_C.USL.MOMENTUM_MODALITY = 0.2
_C.USL.MOMENTUM_MIXED = 0.8
# Update each centroid once per batch with its least similar sample (off as released).
_C.USL.USE_HARD = False
# Token-diversity loss weighted by a softmax over the token pairs (released True).
_C.USL.DIVERSITY_BALANCER = True
# Stage-2 weights: neighbour loss (0.5 SYSU, 0.1 RegDB), cross loss (0.4), mate loss (0.03 SYSU,
# 0.01 RegDB) up to epoch MATE_SWITCH_EPOCH (0-based, 35) and LAMBDA_MATE_LATE after (0.12 SYSU).
_C.USL.LAMBDA_NEIGHBOUR = 0.5
_C.USL.LAMBDA_CROSS = 0.4
_C.USL.LAMBDA_MATE = 0.03
_C.USL.LAMBDA_MATE_LATE = 0.12
_C.USL.MATE_SWITCH_EPOCH = 35
# DTNL neighbour sets: per-token threshold as a fraction of the row maximum (0.9), tokens that
# must agree (4 SYSU, 6 RegDB: all K), query rows per similarity block.
_C.USL.DTNL_THRESHOLD = 0.9
_C.USL.DTNL_VOTES = 4
_C.USL.DTNL_CHUNK = 1024
# Prune same-camera neighbours of another camera-local cluster (released SYSU; needs a
# camera-local run for every camera), and the removal probability (1.0: always).
_C.USL.CAMERA_PRUNING = True
_C.USL.PRUNE_DECAY = 1.0
# RGB clusters an IR cluster may be matched with (released lamba_k 2).
_C.USL.MATCH_CAPACITY = 2
# Corrections of released bugs, all off = the released behaviour:
# RegDB stage 2 looks the neighbour lists up by image index instead of camera id (image 0's);
_C.USL.FIX_REGDB_NEIGHBOUR_INDEX = False
# the pruning examines every neighbour (released: skips the one after each removal);
_C.USL.FIX_PRUNE_SKIP = False
# SYSU stage 2 matches with fewer RGB than IR clusters (the RegDB mirror branch) instead of
# stopping with an error, as the released script does;
_C.USL.FIX_SYSU_MIRROR_BRANCH = False
# the mate loss keeps its rows in ascending order, aligned with their targets;
_C.USL.FIX_MATE_ROW_ORDER = False
# the matching's second pass gives each cluster still without a partner exactly one (released:
# it may fill the clusters it partners up to USL.MATCH_CAPACITY first and run out of clusters to
# give, where the released loop never ends and this project stops with an error).
_C.USL.FIX_MATCH_SECOND_PASS = False
# Evaluation (test protocol) of stages 1 and 2: every EVAL_PERIOD epochs from epoch EVAL_START
# (0-based; released: every epoch from 6), and always at a stage's last epoch.
_C.USL.EVAL_START = 6
_C.USL.EVAL_PERIOD = 1
_C.USL.STAGE1 = CN()
# Stage 1 (intra-modality): epochs, iterations per epoch, SGD lr, cosine period and floor
# (released SYSU 50 x 200, 3.5e-4, 50, 1e-6; RegDB 35 x 100, 3.5e-5, 35, 1e-7), and the metric
# that selects its model (mAP).
_C.USL.STAGE1.EPOCHS = 50
_C.USL.STAGE1.ITERS = 200
_C.USL.STAGE1.LR = 3.5e-4
_C.USL.STAGE1.T_MAX = 50
_C.USL.STAGE1.ETA_MIN = 1e-6
_C.USL.STAGE1.BEST_METRIC = "mAP"
_C.USL.STAGE2 = CN()
# Stage 2 (cross-modal), the same keys (released SYSU 50 x 200, 3.5e-5, 50, 1e-7; RegDB 35 x
# 100, 3.5e-5, 35, 1e-7), selected by Rank-1.
_C.USL.STAGE2.EPOCHS = 50
_C.USL.STAGE2.ITERS = 200
_C.USL.STAGE2.LR = 3.5e-5
_C.USL.STAGE2.T_MAX = 50
_C.USL.STAGE2.ETA_MIN = 1e-7
_C.USL.STAGE2.BEST_METRIC = "rank1"
# Camera-local runs (SYSU: between the stages, each from the stage-1 model, keeping the
# clustering of its best-silhouette epoch for stage 2's pruning).
_C.USL.CAMERA = CN()
# Cameras run, in order (0-based; released 2, 5 (IR) then 0, 1, 3, 4 (RGB)); empty: none (RegDB).
_C.USL.CAMERA.CAMERAS = [2, 5, 0, 1, 3, 4]
# DBSCAN radius of each camera id 0..5 (released 0.2, 0.2, 0.6, 0.5, 0.5, 0.2).
_C.USL.CAMERA.EPS = [0.2, 0.2, 0.6, 0.5, 0.5, 0.2]
# Epochs of an IR (25) and of an RGB (20) camera run, iterations per epoch (50), SGD lr
# (3.5e-4), cosine period and floor (50, 1e-6), memory momentum (0.2).
_C.USL.CAMERA.EPOCHS_IR = 25
_C.USL.CAMERA.EPOCHS_RGB = 20
_C.USL.CAMERA.ITERS = 50
_C.USL.CAMERA.LR = 3.5e-4
_C.USL.CAMERA.T_MAX = 50
_C.USL.CAMERA.ETA_MIN = 1e-6
_C.USL.CAMERA.MOMENTUM = 0.2
# First epoch (0-based) whose clustering may be kept by its silhouette (released 10).
_C.USL.CAMERA.FIRST_EPOCH = 10
# Images per batch of a camera run's feature extraction (released 64).
_C.USL.CAMERA.EXTRACT_BATCH = 64
# Folder holding camera_local_<cam>.pth for a stage-2 run started alone (--stage stage2);
# empty means OUTPUT_DIR.
_C.USL.CAMERA_LOCAL_DIR = ""

# CMAG's stage-2 modules (METHOD cmag; model/cmag/, loss/cmag.py). They act on the pooled batch
# features between the encoder and the memory losses in stage 2 and are not part of the
# evaluated model. The sizes of the released run are unknown (its training script is not
# public): the defaults of the sizes are this project's choice.
_C.USL.CMAG = CN()
# Cross-modal attention of each modality's batch over the other's (released: always on). No
# artifact contains it: this is this project's reconstruction (cma_reconstructed), a gated
# residual that starts as the identity.
_C.USL.CMAG.CMA = True
# token: attend per class token (K tokens of C channels, keeps the token structure the
# neighbour and diversity terms use); vector: attend on the whole K*C descriptor.
_C.USL.CMAG.CMA_MODE = "token"
# Attention heads (must divide C in token mode, K*C in vector mode).
_C.USL.CMAG.CMA_HEADS = 8
# Initial value of the attention's residual gate (0: the stage starts as pure TokenMatcher).
_C.USL.CMAG.CMA_GATE_INIT = 0.0
# The graph-structured memory applied to the RGB batch and then the IR batch (released: on).
_C.USL.CMAG.GRAPH_MEMORY = True
# Hidden width of the graph memory's node encoder and propagation layers (this project's choice).
_C.USL.CMAG.GRAPH_HIDDEN_DIM = 512
# Rows of the graph memory's FIFO of past batch features (this project's choice).
_C.USL.CMAG.GRAPH_MEMORY_SIZE = 2048
# Neighbours per node of the graph memory's kNN graph (released 10).
_C.USL.CMAG.GRAPH_NEIGHBOURS = 10
# The circular memory and loss in place of the graph memory: off (released default path);
# as_compiled (the released code, which cannot train: a shape error once its memory holds rows,
# and a loss without negatives that is NaN with two or more labels); fixed (this project's
# working variant: loop-confirmed positives re-weighted, with negatives).
_C.USL.CMAG.CIRCULAR = "off"
# Weight of the circular term in the total (released 0.1).
_C.USL.CMAG.CIRCULAR_WEIGHT = 0.1
# Temperature of the circular contrastive loss (released 0.07).
_C.USL.CMAG.CIRCULAR_TEMPERATURE = 0.07
# Learning-rate factor of the modules' parameters relative to the stage-2 lr (whether the
# released run optimised them at all is unknown; 1 trains them at the stage's lr).
_C.USL.CMAG.LR_FACTOR = 1.0
# EMA teacher of the encoder: ema <- alpha * ema + (1 - alpha) * param after every step
# (released 0.999; parameters only, never used by the loss).
_C.USL.CMAG.EMA_ALPHA = 0.999
# Copy the student's buffers (BatchNorm statistics) into the teacher at every update (off as
# released, where the teacher keeps the buffers of stage 1's model).
_C.USL.CMAG.EMA_SYNC_BUFFERS = False
# Evaluate and select stage 2 with the EMA teacher instead of the student (off as released).
_C.USL.CMAG.EVAL_WITH_EMA = False


def get_default_config():
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


# Version-1 key -> version-2 key. Version 1 (before the multi-method layout) kept the CMFN
# keys at the root of MODEL and LOSS; files, overrides and checkpoints that use those names
# are read through this table.
RENAMES = {
    **{"MODEL." + k: "MODEL.CMFN." + k for k in (
        "MBUE_AFTER", "DROPOUT", "DROP_PATH", "NUM_HEADS", "WINDOW_SIZE", "SHIFT_SIZE", "MLP_RATIO",
        "FIX.SWIN", "FIX.CONTEXT_PATH", "FIX.DEPTHWISE_IRMLP", "FIX.SEPARATE_COMPRESSION")},
    **{"LOSS." + k: "LOSS.CMFN." + k for k in (
        "CPM_WEIGHT", "CPM_MARGIN", "ORT_WEIGHT", "DCL_WEIGHTS", "DCL_MILESTONES")},
}
_RENAMED_NODES = {"MODEL.FIX": "MODEL.CMFN.FIX"}

# Keys whose value must be one of a fixed set; the registered parts (MODEL.NAME, LOSS.NAME,
# DATASET.NAME, DATALOADER.SAMPLER, SOLVER.OPTIMIZER, SOLVER.SCHEDULER) and TEST.FEATURE (the
# model's presets) are checked against their registries by :func:`validate_config`.
CHOICES = {
    "DATASET.RELABEL": ("set", "sorted"),
    "INPUT.RESIZE_FILTER": ("lanczos", "bilinear", "bicubic"),
    "INPUT.TEST_RESIZE_FILTER": ("", "lanczos", "bilinear", "bicubic"),
    "INPUT.ERASE_STYLE": ("zhong", "torchvision"),
    "MODEL.BACKBONE": ("resnet50", "resnet18"),
    "MODEL.LAST_STRIDE": (1, 2),
    "MODEL.CMFN.MBUE_AFTER": ("layer3", "layer2"),
    "MODEL.FUSIONREID.VI_SIE": ("camera", "modality", "camera_modality"),
    "MODEL.FUSIONREID.VI_CNN_STEM": ("shared", "modality"),
    "MODEL.FUSIONREID.VI_VIT_STEM": ("shared", "modality"),
    "LOSS.IVREID.KL_REDUCTION": ("batchmean", "mean"),
    "LOSS.IVREID.TRI_FEATURE": ("feat", "pool"),
    "DATALOADER.BALANCED_ORDER": ("seeded", "reference"),
    "SOLVER.SCHEDULE_UNIT": ("epoch", "iteration"),
    "SOLVER.AMP": ("none", "bf16", "fp16", "auto"),
    "SOLVER.COMPILE_BACKEND": ("inductor", "aot_eager"),
    "SOLVER.BEST_METRIC": ("rank1", "mAP", "mINP"),
    "SOLVER.SELECT_BY": ("test", "val", "last"),
    "TEST.MODE": ("all", "indoor"),
    "TEST.DIRECTION": ("ir2vis", "vis2ir"),
    "TEST.GALLERY": ("seeded", "official", "seeded_cam_major"),
    "TEST.FLIP_MODE": ("sum", "mean", "average_raw"),
    "USL.INPUT.RESIZE_FILTER": ("bicubic", "bilinear"),
    "USL.INPUT.LAYOUT_STAGE1": ("jitter_view2", "jitter_first"),
    "USL.INPUT.LAYOUT_CAMERA": ("jitter_view2", "jitter_first"),
    "USL.INPUT.LAYOUT_STAGE2": ("jitter_view2", "jitter_first"),
    "USL.SAMPLER_ORDER": ("seeded", "reference"),
    "USL.CAMERA_SLOT_STAGE2": ("index", "camera"),
    "USL.CLUSTER.KNN_BACKEND": ("torch", "faiss"),
    "USL.STAGE1.BEST_METRIC": ("rank1", "mAP", "mINP"),
    "USL.STAGE2.BEST_METRIC": ("rank1", "mAP", "mINP"),
    "USL.CMAG.CMA_MODE": ("token", "vector"),
    "USL.CMAG.CIRCULAR": ("off", "as_compiled", "fixed"),
    "TEST.DISTANCE": ("cosine", "euclidean", "sqeuclidean"),
    "TEST.DISTANCE_DTYPE": ("float32", "float64"),
    "TEST.RERANK_EXPANSION": ("released", "paper"),
    "TEST.AMP": ("none", "bf16"),
}


def _suggest(key, choices):
    close = difflib.get_close_matches(key, choices, n=1)
    return " (did you mean %s?)" % close[0] if close else ""


def _renamed(full_key):
    """The current name of a (possibly version-1) flattened key or node."""
    if full_key in RENAMES:
        return RENAMES[full_key]
    return _RENAMED_NODES.get(full_key, full_key)


def _lookup(cfg, full_key):
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


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


def _flatten_data(data, prefix=""):
    """[(full key, value)] of a nested mapping; a version-1 node is renamed as a whole."""
    out = []
    for key, value in data.items():
        full_key = _renamed(prefix + str(key))
        if isinstance(value, dict) and value:
            out += _flatten_data(value, full_key + ".")
        else:
            out.append((full_key, value))
    return out


def _set(cfg, full_key, value, source):
    node, parts = cfg, full_key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], CN):
            raise ConfigError("%s: unknown config key %s%s" % (
                source, full_key, _suggest(part, [k for k in node.keys() if isinstance(node[k], CN)])))
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise ConfigError("%s: unknown config key %s%s" % (source, full_key, _suggest(leaf, list(node.keys()))))
    if isinstance(node[leaf], CN):
        if isinstance(value, dict):  # an empty mapping
            return
        raise ConfigError("%s: %s is a group of keys, not a value (got %r)" % (source, full_key, value))
    node[leaf] = _coerce(value, node[leaf], full_key, source)


def _merge_dict(cfg, data, source, prefix=""):
    if not isinstance(data, dict):
        raise ConfigError("%s: expected a mapping at %s, got %r" % (source, prefix or "top level", data))
    for full_key, value in _flatten_data(data, prefix):
        _set(cfg, full_key, value, source)


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
    if not isinstance(data, dict):
        raise ConfigError("%s: expected a mapping at top level, got %r" % (path, data))
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
        full_key = _renamed(full_key)
        value = _parse_value(text)
        try:
            default = _lookup(cfg, full_key)
        except (KeyError, TypeError):
            default = None
        if isinstance(default, str) and not isinstance(value, str):
            value = text
        _set(cfg, full_key, value, source)
    return cfg


def is_config_key(token):
    """True when `token` names a config key (version-1 names included)."""
    try:
        _lookup(_C, _renamed(token))
    except (KeyError, TypeError):
        return False
    return True


def method_names():
    """The method presets: sub-folders of configs/."""
    return sorted(d for d in os.listdir(CONFIG_DIR) if os.path.isdir(os.path.join(CONFIG_DIR, d)))


def preset_path(method, dataset):
    """configs/<method>/<dataset>.yaml, or a ConfigError listing what exists."""
    methods = method_names()
    if method not in methods:
        raise ConfigError("no method %r (expected a folder %s); available: %s"
                          % (method, os.path.join(CONFIG_DIR, str(method)), ", ".join(methods)))
    folder = os.path.join(CONFIG_DIR, method)
    path = os.path.join(folder, dataset + ".yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("_"))
        raise ConfigError("method %s has no config for dataset %r (expected %s); available: %s"
                          % (method, dataset, path, ", ".join(names)))
    return path


def add_config_arguments(parser):
    """The config options shared by train.py, test.py and the tools."""
    parser.add_argument("--method", help="method preset: configs/METHOD/DATASET.yaml (%s; default cmfn)"
                        % ", ".join(method_names()))
    parser.add_argument("--dataset", help="dataset of the preset (sysu, regdb, llcm, demo, ...)")
    parser.add_argument("--config", help="a YAML config file (merged after --method/--dataset)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. SOLVER.MAX_EPOCHS 2")
    return parser


def validate_config(cfg, check_feature=True):
    """Check every enumerated value, so a bad one fails at start-up and not after an epoch.

    ``check_feature=False`` leaves TEST.FEATURE to be checked against a model loaded later
    (test.py takes the model from the checkpoint, not from MODEL.NAME).
    """
    for key, choices in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in choices:
            raise ConfigError("%s must be one of %s, got %r" % (key, ", ".join(map(str, choices)), value))
    for key in ("TEST.SHOTS", "TEST.NUM_TRIALS", "TEST.BATCH_SIZE", "TEST.MAX_RANK", "DATALOADER.NUM_IDS",
                "DATALOADER.NUM_POS"):
        if _lookup(cfg, key) < 1:
            raise ConfigError("%s must be >= 1, got %r" % (key, _lookup(cfg, key)))
    from data.registry import DATASETS
    from data.samplers.registry import SAMPLERS
    from engine.solver import OPTIMIZERS, SCHEDULES
    from loss.registry import CRITERIA
    from model.registry import MODELS

    DATASETS.get(cfg.DATASET.NAME)
    SAMPLERS.get(cfg.DATALOADER.SAMPLER)
    OPTIMIZERS.get(cfg.SOLVER.OPTIMIZER)
    SCHEDULES.get(cfg.SOLVER.SCHEDULER)
    CRITERIA.get(cfg.LOSS.NAME)
    model = MODELS.get(cfg.MODEL.NAME)
    if check_feature and cfg.TEST.FEATURE and cfg.TEST.FEATURE not in model.embedding_presets:
        raise ConfigError("TEST.FEATURE %r is not an embedding of the %s model (known: %s; empty = its default %s)"
                          % (cfg.TEST.FEATURE, cfg.MODEL.NAME, ", ".join(model.embedding_presets),
                             model.default_embedding))
    return cfg


def build_config(dataset=None, config_file=None, opts=(), freeze=True, method=None, validate=True,
                 check_feature=True):
    """Defaults <- configs/<method>/<dataset>.yaml <- config_file <- opts, validated."""
    cfg = get_default_config()
    if dataset or method:
        merge_from_file(cfg, preset_path(method or "cmfn", dataset or "sysu"))
    if config_file:
        merge_from_file(cfg, config_file)
    merge_from_list(cfg, list(opts))
    if validate:
        validate_config(cfg, check_feature)
    if freeze:
        cfg.freeze()
    return cfg


def config_from_args(args, extra_opts=(), freeze=True, check_feature=True):
    """Build the config from parsed :func:`add_config_arguments` options.

    `extra_opts` (KEY VALUE pairs from script-specific flags such as ``--mode``) are applied
    before the trailing command-line overrides. Without --config, --method defaults to cmfn
    and --dataset to sysu.
    """
    method, dataset = getattr(args, "method", None), args.dataset
    if not args.config and not dataset:
        dataset = "sysu"
    if dataset and not method:
        method = "cmfn"
    return build_config(dataset, args.config, list(extra_opts) + list(args.opts or []), freeze, method=method,
                        check_feature=check_feature)


def config_from_string(text, source="checkpoint"):
    """Rebuild a config from the YAML text stored in a checkpoint or run directory.

    Version-1 texts are read through RENAMES; the result is not validated (the caller
    decides what a stored config must satisfy).
    """
    cfg = get_default_config()
    data = yaml.safe_load(text) or {}
    if isinstance(data, dict) and "CONFIG_VERSION" not in data:
        data["CONFIG_VERSION"] = _C.CONFIG_VERSION
    _merge_dict(cfg, data, source)
    return cfg


def default_output_dir(cfg):
    """runs/[<METHOD>_]<the dataset's run name> when OUTPUT_DIR is empty."""
    if cfg.OUTPUT_DIR:
        return cfg.OUTPUT_DIR
    from data.registry import DATASETS

    name = DATASETS.get(cfg.DATASET.NAME).run_name(cfg)
    if cfg.METHOD != "cmfn":
        name = "%s_%s" % (cfg.METHOD, name)
    return os.path.join("runs", name)
