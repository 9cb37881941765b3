"""The training set: visible and infrared image arrays with labels, sampled in pairs.

``TrainSet[(i_rgb, i_ir)]`` -> ``(img_v [3, H, W] float32, img_i [3, H, W], label_v,
label_i)``. Images are uint8 arrays [N, H, W, 3] at the training size (memory-mapped for
SYSU, decoded in memory for RegDB/LLCM); ``rows`` select the images that belong to the
training identities (``DATASET.VAL_IDS`` holds the last labels out for validation).

When the index is a :class:`data.sampler.SamplePair`, its seed drives both images'
augmentations through one ``torch.Generator`` (visible first, then infrared), so a sample
is augmented identically in any worker; a plain tuple uses torch's global RNG.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from data.registry import get_dataset
from data.transforms import build_train_transforms
from utils.config import ConfigError


def _reopenable(array):
    """A picklable description of a memory-mapped .npy (path), else the array itself."""
    if isinstance(array, np.memmap) and array.filename:
        return ("npy", array.filename)
    return ("array", array)


def _reopen(state):
    kind, value = state
    return np.load(value, mmap_mode="r") if kind == "npy" else value


class TrainSet(Dataset):
    def __init__(self, rgb_images, rgb_labels, ir_images, ir_labels, transform_v, transform_i,
                 rgb_rows=None, ir_rows=None):
        self.rgb_images, self.ir_images = rgb_images, ir_images
        self.rgb_rows = np.arange(len(rgb_images)) if rgb_rows is None else np.asarray(rgb_rows, dtype=np.int64)
        self.ir_rows = np.arange(len(ir_images)) if ir_rows is None else np.asarray(ir_rows, dtype=np.int64)
        self.rgb_labels = np.asarray(rgb_labels, dtype=np.int64)
        self.ir_labels = np.asarray(ir_labels, dtype=np.int64)
        if len(self.rgb_labels) != len(self.rgb_rows) or len(self.ir_labels) != len(self.ir_rows):
            raise ValueError("labels and rows differ in length")
        self.num_classes = int(len(np.unique(self.rgb_labels)))
        self.transform_v, self.transform_i = transform_v, transform_i

    def __len__(self):
        return max(len(self.rgb_rows), len(self.ir_rows))

    def __getitem__(self, item):
        i, j = item
        seed = getattr(item, "seed", None)
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        img_v = self.transform_v(self.rgb_images[self.rgb_rows[i]], g)
        img_i = self.transform_i(self.ir_images[self.ir_rows[j]], g)
        return img_v, img_i, int(self.rgb_labels[i]), int(self.ir_labels[j])

    def __getstate__(self):
        # Memory-mapped arrays are reopened by path in spawned workers instead of being copied.
        state = dict(self.__dict__)
        state["rgb_images"] = _reopenable(self.rgb_images)
        state["ir_images"] = _reopenable(self.ir_images)
        return state

    def __setstate__(self, state):
        state["rgb_images"] = _reopen(state["rgb_images"])
        state["ir_images"] = _reopen(state["ir_images"])
        self.__dict__.update(state)


def build_train_set(cfg):
    """The training set of cfg.DATASET.NAME at INPUT.SIZE_TRAIN, without the held-out ids."""
    height, width = int(cfg.INPUT.SIZE_TRAIN[0]), int(cfg.INPUT.SIZE_TRAIN[1])
    rgb, rgb_labels, ir, ir_labels = get_dataset(cfg).train_images((width, height))
    num_classes = int(rgb_labels.max()) + 1
    held = int(cfg.DATASET.VAL_IDS)
    if held < 0 or held >= num_classes:
        raise ConfigError("DATASET.VAL_IDS = %d, expected 0 <= VAL_IDS < %d (training identities)" % (held, num_classes))
    if num_classes - held < cfg.DATALOADER.NUM_IDS:
        raise ConfigError("%d training identities (after holding out DATASET.VAL_IDS = %d) but DATALOADER.NUM_IDS = %d"
                          % (num_classes - held, held, cfg.DATALOADER.NUM_IDS))
    keep_rgb = np.flatnonzero(rgb_labels < num_classes - held)
    keep_ir = np.flatnonzero(ir_labels < num_classes - held)
    tv, ti = build_train_transforms(cfg)
    return TrainSet(rgb, rgb_labels[keep_rgb], ir, ir_labels[keep_ir], tv, ti, keep_rgb, keep_ir)
