"""The training set: augmented samples of the dataset's training items.

``TrainSet[index]`` with ``index`` a :class:`data.samplers.base.SampleIndex` (or int) gives
one sample dict ``{"images": [3, H, W] float32, "pids", "camids", "modality", "index"}``; a
:class:`data.samplers.base.SamplePair` ``(i_visible, i_infrared)`` gives the two samples
``(visible, infrared)``. The item's (pair's) seed drives its augmentations through one
``torch.Generator`` (for a pair: the visible image first, then the infrared one), so a sample
is augmented identically in any worker; without a seed torch's global RNG is used.

Items are the dataset's training items, renumbered 0..n-1 after the held-out identities
(``DATASET.VAL_IDS``, the last labels) are left out; ``pids``, ``camids`` and ``modality``
are int64 arrays over them.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from data.registry import get_dataset
from data.samplers.base import SamplePair
from data.transforms import build_train_transforms
from utils.errors import ConfigError


class TrainSet(Dataset):
    def __init__(self, items, transforms, rows=None):
        self.images = items.images
        self.rows = np.arange(len(items)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.pids = items.pids[self.rows]
        self.camids = items.camids[self.rows]
        self.modality = items.modality[self.rows]
        self.num_classes = int(len(np.unique(self.pids)))
        self.transforms = transforms

    def __len__(self):
        return len(self.rows)

    def _sample(self, i, g):
        return {"images": self.transforms[int(self.modality[i])](self.images[int(self.rows[i])], g),
                "pids": int(self.pids[i]), "camids": int(self.camids[i]), "modality": int(self.modality[i]),
                "index": int(i)}

    def __getitem__(self, item):
        seed = getattr(item, "seed", None)
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        if isinstance(item, SamplePair):
            return self._sample(item[0], g), self._sample(item[1], g)
        return self._sample(int(item), g)


def build_train_set(cfg):
    """The training set of cfg.DATASET.NAME at INPUT.SIZE_TRAIN, without the held-out ids."""
    height, width = int(cfg.INPUT.SIZE_TRAIN[0]), int(cfg.INPUT.SIZE_TRAIN[1])
    items = get_dataset(cfg).train_items((width, height))
    num_classes = int(items.pids.max()) + 1
    held = int(cfg.DATASET.VAL_IDS)
    if held < 0 or held >= num_classes:
        raise ConfigError("DATASET.VAL_IDS = %d, expected 0 <= VAL_IDS < %d (training identities)" % (held, num_classes))
    if num_classes - held < cfg.DATALOADER.NUM_IDS:
        raise ConfigError("%d training identities (after holding out DATASET.VAL_IDS = %d) but DATALOADER.NUM_IDS = %d"
                          % (num_classes - held, held, cfg.DATALOADER.NUM_IDS))
    keep = np.flatnonzero(items.pids < num_classes - held)
    visible, infrared = build_train_transforms(cfg)
    return TrainSet(items, {0: visible, 1: infrared}, keep)
