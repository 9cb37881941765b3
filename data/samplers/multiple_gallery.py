"""The multiple-gallery sampler of cluster-contrast ReID (TokenMatcher / CMAG), registered as
"multiple_gallery".

It samples one modality's pseudo-labelled items: ``labels`` [N] (-1 = outlier, never
sampled) and ``cams`` [N], the value in the list's camera slot: the real camera, or the
item's own index where the released SYSU stage 2 puts it there (:func:`camera_slot`), which
turns "another camera" into "another image".

**One pass** (:func:`one_pass`), over the labels in the order of their first item:

1. visit the labels in a random permutation;
2. per label: draw an anchor among its items; then ``num_instances - 1`` items among the
   label's items whose camera differs from the anchor's, without replacement when there are
   at least ``num_instances`` of them, with replacement otherwise;
3. if no item has another camera, the same draw among the label's other items; a label with
   a single item yields only its anchor (which shifts every later batch boundary).

The draws (:class:`ReleasedDraws`) are the released ones: ``torch.randperm`` for the
permutation, ``random.choice`` for the anchor, ``np.random.choice`` over the candidates'
positions; ``ReleasedDraws.global_state()`` uses the process-global generators as released,
``ReleasedDraws.from_seed(s)`` private ones that give the same items as the released sampler
right after ``torch.manual_seed(s); random.seed(s); np.random.seed(s)``.

**An epoch** is ``num_iters`` global batches of ``batch_size`` items (0: one pass): passes are
drawn one after the other, each cut to a multiple of ``batch_size`` (the released DataLoader
drops the last short batch and its iterator restarts with a new pass when exhausted), and
concatenated. Draws per epoch (``order``):

* ``seeded``: pass p of epoch e draws from ``np.random.default_rng([seed, stream, e, 0, p])``
  (permutation, anchor index, candidates), so an epoch's plan depends on nothing else;
* ``reference``: the released draws from :class:`ReleasedDraws` streams seeded per epoch with
  ``default_rng([seed, stream, e, 2])`` and continued from pass to pass.

``stream`` separates samplers sharing a seed (the RGB and IR loaders of one epoch).

With DDP, rank r of W takes positions r*B/W .. (r+1)*B/W - 1 of every global batch of B.
Items are :class:`data.samplers.base.SampleIndex` numbers (rows of ``labels``) with an
augmentation seed per global position from ``default_rng([seed, stream, epoch, 1])``.
"""
import random

import numpy as np
import torch
from torch.utils.data import Sampler

from data.errors import DatasetError
from data.samplers.base import SampleIndex, epoch_seed
from data.samplers.registry import SAMPLERS
from utils.errors import ConfigError


def camera_slot(cams, mode):
    """The camera-slot values of a pseudo-labelled list: ``camera`` = the real cameras
    `cams` [N]; ``index`` = 0..N-1 (released SYSU stage 2: every image its own camera)."""
    cams = np.asarray(cams, dtype=np.int64).reshape(-1)
    if mode == "camera":
        return cams
    if mode == "index":
        return np.arange(len(cams), dtype=np.int64)
    raise ConfigError("camera slot must be 'camera' or 'index', got %r" % (mode,))


class ReleasedDraws:
    """The released sampler's generators: ``torch_generator`` (None = torch's default),
    ``py`` (``random.Random`` or the ``random`` module), ``np_rs`` (``RandomState`` or the
    ``np.random`` module)."""

    def __init__(self, torch_generator=None, py=random, np_rs=np.random):
        self.torch, self.py, self.np = torch_generator, py, np_rs

    @classmethod
    def from_seed(cls, seed):
        seed = int(seed)
        return cls(torch.Generator().manual_seed(seed), random.Random(seed), np.random.RandomState(seed))

    @classmethod
    def global_state(cls):
        return cls(None, random, np.random)

    def permutation(self, n):
        return torch.randperm(n, generator=self.torch).tolist()

    def anchor(self, members):
        return self.py.choice(members)

    def choice(self, positions, size, replace):
        return self.np.choice(positions, size=size, replace=replace).tolist()


class SeededDraws:
    """The same three kinds of draws from one ``np.random.Generator``."""

    def __init__(self, rng):
        self.rng = rng

    def permutation(self, n):
        return self.rng.permutation(n).tolist()

    def anchor(self, members):
        return members[int(self.rng.integers(len(members)))]

    def choice(self, positions, size, replace):
        return self.rng.choice(positions, size=size, replace=replace).tolist()


def label_groups(labels):
    """``[(label, members)]`` over labels >= 0 in the order of their first item; members:
    item numbers in item order (int64)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    items = np.flatnonzero(labels >= 0)
    if not len(items):
        return []
    order = np.argsort(labels[items], kind="stable")
    values, starts = np.unique(labels[items][order], return_index=True)
    blocks = np.split(items[order], starts[1:])
    first = np.argsort([b[0] for b in blocks], kind="stable")
    return [(int(values[k]), blocks[k]) for k in first]


def one_pass(groups, cams, num_instances, draws):
    """One pass of item numbers (module docstring) over `groups` (:func:`label_groups`),
    camera slots `cams` [N], with `draws` (:class:`ReleasedDraws` or :class:`SeededDraws`)."""
    out = []
    extra = num_instances - 1
    for k in draws.permutation(len(groups)):
        members = groups[k][1]
        anchor = int(draws.anchor(members.tolist()))
        out.append(anchor)
        candidates = np.flatnonzero(cams[members] != cams[anchor])
        if not len(candidates):
            candidates = np.flatnonzero(members != anchor)
            if not len(candidates):
                continue
        picks = draws.choice(candidates.tolist(), extra, len(candidates) < num_instances)
        out.extend(members[picks].tolist())
    return out


@SAMPLERS.register("multiple_gallery")
class MultipleGallerySampler(Sampler):
    """Anchor + other-camera instances per pseudo label; see the module docstring.

    ``labels`` [N] (-1 skipped), ``cams`` [N] camera slots, ``num_instances`` items per label,
    ``batch_size`` items per global batch, ``num_iters`` batches per epoch (0 = one pass),
    ``epoch`` the epoch selected at construction.
    """

    collate = "single"

    def __init__(self, labels, cams, num_instances, batch_size, num_iters=0, seed=0, order="seeded", stream=0,
                 rank=0, world_size=1, epoch=0):
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.cams = np.asarray(cams, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.cams):
            raise ValueError("multiple-gallery sampler: %d labels but %d camera slots"
                             % (len(self.labels), len(self.cams)))
        if order not in ("seeded", "reference"):
            raise ConfigError("sampler order must be seeded or reference, got %r" % (order,))
        self.num_instances, self.global_batch, self.num_iters = int(num_instances), int(batch_size), int(num_iters)
        if self.num_instances < 1 or self.global_batch < 1 or self.num_iters < 0:
            raise ConfigError("multiple-gallery sampler: num_instances %d and batch size %d must be >= 1, iterations "
                              "%d >= 0" % (self.num_instances, self.global_batch, self.num_iters))
        self.seed, self.stream, self.order = int(seed), int(stream), order
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError("rank %d / world size %d" % (self.rank, self.world_size))
        if self.global_batch % self.world_size:
            raise ConfigError("batch size %d must be divisible by the world size %d"
                              % (self.global_batch, self.world_size))
        self.groups = label_groups(self.labels)
        if not self.groups:
            raise DatasetError("multiple-gallery sampler: no pseudo-labelled items (all %d are outliers)"
                               % len(self.labels))
        self.generator = None
        self.epoch = None
        self._items = None
        self.set_epoch(epoch)

    @classmethod
    def from_config(cls, cfg, train_set, rank=0, world_size=1):
        """Over ``train_set.pids`` / ``camids``: K = DATALOADER.NUM_POS instances per label,
        P*K items per batch, SOLVER.ITERS_PER_EPOCH batches (0 = one pass), seeded order."""
        return cls(train_set.pids, train_set.camids, cfg.DATALOADER.NUM_POS,
                   int(cfg.DATALOADER.NUM_IDS) * int(cfg.DATALOADER.NUM_POS), num_iters=int(cfg.SOLVER.ITERS_PER_EPOCH),
                   seed=cfg.SEED, rank=rank, world_size=world_size)

    @property
    def batch_size(self):
        """Items per batch on this rank."""
        return self.global_batch // self.world_size

    def pass_items(self, draws):
        """One pass with `draws` (module docstring)."""
        return one_pass(self.groups, self.cams, self.num_instances, draws)

    def _passes(self, epoch):
        if self.order == "reference":
            draws = ReleasedDraws.from_seed(
                np.random.default_rng([self.seed, self.stream, epoch, 2]).integers(0, 2**32))
            while True:
                yield draws
        p = 0
        while True:
            yield SeededDraws(np.random.default_rng([self.seed, self.stream, epoch, 0, p]))
            p += 1

    def epoch_items(self, epoch=None):
        """The global items [num_iters * batch_size] (one cut pass if num_iters is 0) of `epoch`
        (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if epoch == self.epoch and self._items is not None:
            return self._items
        need = self.num_iters * self.global_batch
        items = []
        for draws in self._passes(epoch):
            one = self.pass_items(draws)
            usable = len(one) // self.global_batch * self.global_batch
            if not usable:
                raise DatasetError("multiple-gallery sampler: a pass yields %d items (%d pseudo labels x %d "
                                   "instances), fewer than one batch of %d"
                                   % (len(one), len(self.groups), self.num_instances, self.global_batch))
            items.extend(one[:usable])
            if len(items) >= need:
                break
        return np.asarray(items[:need] if need else items, dtype=np.int64)

    def set_epoch(self, epoch):
        """Select the epoch's plan; also reseeds an attached DataLoader generator."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._items = self.epoch_items(epoch)
        self.epoch = epoch
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def plan(self, epoch=None):
        """Global plan of `epoch`: (items, augmentation seeds), each [batches, batch_size]."""
        items = self.epoch_items(epoch)
        epoch = self.epoch if epoch is None else int(epoch)
        seeds = np.random.default_rng([self.seed, self.stream, epoch, 1]).integers(0, 2**62, size=len(items))
        return items.reshape(-1, self.global_batch), seeds.reshape(-1, self.global_batch)

    def __len__(self):
        return len(self._items) // self.world_size

    def __iter__(self):
        items, seeds = self.plan()
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i, s in zip(items[:, part].reshape(-1).tolist(), seeds[:, part].reshape(-1).tolist()):
            yield SampleIndex(i, s)
