"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash or an interrupt therefore never leaves a half-written array, checkpoint or result
file under the final name; readers see either the old file or the new one.
"""
import contextlib
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path, array):
    """np.save(path, array) atomically (`path` must end in .npy)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_torch(path, obj):
    """torch.save(obj, path) atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_json(path, obj, indent=2):
    save_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def append_jsonl(path, record):
    """Append one JSON line; the line is written with a single write call."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
