"""Training items: one row per image with its identity, camera and modality.

``TrainItems(images, pids, camids, modality)``: ``images[i]`` is image i as a uint8 array
[H, W, 3]; ``pids`` (training labels 0..C-1), ``camids`` and ``modality`` (0 visible,
1 infrared) are int64 arrays [N]. Datasets build them with :func:`from_modality_arrays`
from one visible and one infrared block (visible items first), whose image arrays may be
memory-mapped: :class:`ArrayImages` reopens a memory-mapped array by path when pickled to a
DataLoader worker instead of copying it.
"""
from dataclasses import dataclass

import numpy as np

from data.errors import DatasetError


def _reopenable(array):
    if isinstance(array, np.memmap) and array.filename:
        return ("npy", array.filename)
    return ("array", array)


def _reopen(state):
    kind, value = state
    return np.load(value, mmap_mode="r") if kind == "npy" else value


class ArrayImages:
    """Several uint8 image arrays [N_k, H, W, 3] read as one sequence of images."""

    def __init__(self, arrays):
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if not 0 <= i < self.offsets[-1]:
            raise IndexError("image %d of %d" % (i, len(self)))
        return self.arrays[k][i - self.offsets[k]]

    def __getstate__(self):
        return {"arrays": [_reopenable(a) for a in self.arrays], "offsets": self.offsets}

    def __setstate__(self, state):
        self.arrays = [_reopen(a) for a in state["arrays"]]
        self.offsets = state["offsets"]


@dataclass
class TrainItems:
    images: object
    pids: np.ndarray
    camids: np.ndarray
    modality: np.ndarray

    def __post_init__(self):
        self.pids = np.asarray(self.pids, dtype=np.int64).reshape(-1)
        self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
        self.modality = np.asarray(self.modality, dtype=np.int64).reshape(-1)
        if not len(self.images) == len(self.pids) == len(self.camids) == len(self.modality):
            raise ValueError("TrainItems: %d images, %d pids, %d camids, %d modality entries"
                             % (len(self.images), len(self.pids), len(self.camids), len(self.modality)))

    def __len__(self):
        return len(self.pids)


def from_modality_arrays(rgb, rgb_labels, rgb_cams, ir, ir_labels, ir_cams, source="training set"):
    """TrainItems of a visible block followed by an infrared block."""
    for what, images, labels, cams in (("visible", rgb, rgb_labels, rgb_cams), ("infrared", ir, ir_labels, ir_cams)):
        if not len(images) == len(labels) == len(cams):
            raise DatasetError("%s: %d %s images but %d labels and %d cameras (out of date? rerun its preparation)"
                               % (source, len(images), what, len(labels), len(cams)))
    nv, ni = len(rgb_labels), len(ir_labels)
    return TrainItems(
        images=ArrayImages([rgb, ir]),
        pids=np.concatenate([np.asarray(rgb_labels), np.asarray(ir_labels)]),
        camids=np.concatenate([np.asarray(rgb_cams), np.asarray(ir_cams)]),
        modality=np.concatenate([np.zeros(nv, np.int64), np.ones(ni, np.int64)]),
    )
