"""The sampler contract, the sampled items and the two batch layouts.

A sampler registered in :data:`data.samplers.registry.SAMPLERS` is a
``torch.utils.data.Sampler`` built by ``cls.from_config(cfg, train_set, rank, world_size)``
from the training set's per-item arrays (``train_set.pids``, ``train_set.camids``,
``train_set.modality``; item i is row i of them). It provides

* ``set_epoch(epoch)``: selects the epoch's plan (and reseeds the DataLoader ``generator``
  attached to it, when there is one); call it before iterating an epoch;
* ``batch_size``: items per batch on this rank (a :class:`SamplePair` counts once);
* ``__len__``: items of the current epoch on this rank, a multiple of ``batch_size``;
* ``collate``: ``"paired"`` when it yields :class:`SamplePair` items, ``"single"`` when it
  yields :class:`SampleIndex` items.

A paired batch holds, for B pairs, the B visible images first and then the B infrared
images in the same order: rows i and B + i are the two images of pair i (same identity). Each
item carries an augmentation seed; the training set seeds the item's transforms with it, so a
batch does not depend on the number of workers or processes.

Batches are dicts: ``images`` [N, 3, H, W] float32, ``pids``, ``camids``, ``modality``
(0 visible, 1 infrared) and ``index`` (the item numbers), each [N] int64.
"""
import numpy as np
import torch


class SamplePair(tuple):
    """``(i_visible, i_infrared)`` item numbers with the pair's augmentation seed as ``.seed``."""

    def __new__(cls, i_vis, i_ir, seed=None):
        obj = super().__new__(cls, (int(i_vis), int(i_ir)))
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SamplePair, (self[0], self[1], self.seed))


class SampleIndex(int):
    """An item number with its augmentation seed as ``.seed``."""

    def __new__(cls, index, seed=None):
        obj = super().__new__(cls, int(index))
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SampleIndex, (int(self), self.seed))


def epoch_seed(seed, epoch):
    """A 63-bit seed derived from (seed, epoch) for torch generators."""
    return int(np.random.default_rng([int(seed), int(epoch), 2]).integers(0, 2**63 - 1))


def _stack(samples):
    return {key: torch.stack([s[key] for s in samples]) if key == "images"
            else torch.tensor([s[key] for s in samples], dtype=torch.int64) for key in samples[0]}


def collate_single(samples):
    """A list of sample dicts -> one batch dict."""
    return _stack(samples)


def collate_paired(pairs):
    """A list of (visible sample, infrared sample) -> one batch dict, visible rows first."""
    vis, ir = _stack([p[0] for p in pairs]), _stack([p[1] for p in pairs])
    return {key: torch.cat([vis[key], ir[key]]) for key in vis}


COLLATE = {"paired": collate_paired, "single": collate_single}
