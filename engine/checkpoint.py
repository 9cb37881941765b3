"""Checkpoint format of this project.

A checkpoint is a plain dict of tensors and Python values, so ``torch.load(path,
weights_only=True)`` reads it without unpickling arbitrary objects:

=================  ==========================================================================
key                content
=================  ==========================================================================
``format``         ``"cmfn-checkpoint"``
``version``        format version (int)
``model``          the model's ``state_dict()``
``config``         the resolved config as YAML text (``cfg.dump()``)
``num_classes``    classifier size the model was built with
``epoch``          last completed epoch (-1 for weights not produced by train.py)
optional           ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``best``, ``meta``...
=================  ==========================================================================
"""
import hashlib
import os

import torch

from utils.io import save_torch
from utils.errors import UserError

FORMAT = "cmfn-checkpoint"
VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or not in this project's format."""


def make_checkpoint(model_state, cfg, num_classes, epoch=-1, **extra):
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_state,
        "config": cfg.dump(),
        "num_classes": int(num_classes),
        "epoch": int(epoch),
    }
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path, ckpt):
    """Write `ckpt` atomically (temporary file + rename)."""
    save_torch(path, ckpt)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint of this project with ``weights_only=True``; clear errors otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError("checkpoint not found: %s" % path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError("cannot read checkpoint %s: %s" % (path, exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            "%s is not a checkpoint of this project (no 'format': %r entry); convert a checkpoint "
            "of the released code with tools/convert_official_checkpoint.py" % (path, FORMAT)
        )
    for key in ("model", "config", "num_classes"):
        if key not in ckpt:
            raise CheckpointError("checkpoint %s has no %r entry" % (path, key))
    return ckpt


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file (recorded with test results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
