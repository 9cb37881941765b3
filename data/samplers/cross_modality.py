"""The cross-modality identity sampler of CMFN, registered as "cross_modality".

Every global batch holds P distinct identities (drawn without replacement) and, for each in
order, K visible and K infrared items drawn uniformly with replacement; visible and infrared
are aligned by position (same identity at the same place), identities grouped in runs of K.
An epoch has ``num_iters`` batches (default: the released int(N / (P*K)) + 1 with N the larger
modality).

The plan of an epoch comes from ``np.random.default_rng([seed, epoch])`` alone, so it is
the same whatever ran before. With DDP, rank r of W takes identities r*P/W .. (r+1)*P/W - 1
of every global batch: the ranks' batches are disjoint and together form the global batch.

Items are :class:`data.samplers.base.SamplePair` ``(i_visible, i_infrared)`` of training-set
item numbers carrying ``.seed``, an augmentation seed drawn per global position from
``default_rng([seed, epoch, 1])``.
"""
import numpy as np
from torch.utils.data import Sampler

from data.samplers.base import SamplePair, epoch_seed
from data.samplers.registry import SAMPLERS
from utils.errors import ConfigError

_AUG_STREAM = 1


@SAMPLERS.register("cross_modality")
class CrossModalitySampler(Sampler):
    """P identities x K visible + K infrared per batch; see the module docstring.

    ``rgb_items`` / ``ir_items`` are the item numbers of the two modalities (default: their
    positions), ``rgb_labels`` / ``ir_labels`` their identities.
    """

    collate = "paired"

    def __init__(self, rgb_labels, ir_labels, num_ids, num_pos, seed=0, num_iters=0, rank=0, world_size=1,
                 rgb_items=None, ir_items=None):
        self.rgb_labels = np.asarray(rgb_labels, dtype=np.int64)
        self.ir_labels = np.asarray(ir_labels, dtype=np.int64)
        self.rgb_items = np.arange(len(self.rgb_labels)) if rgb_items is None else np.asarray(rgb_items, np.int64)
        self.ir_items = np.arange(len(self.ir_labels)) if ir_items is None else np.asarray(ir_items, np.int64)
        self.num_ids, self.num_pos = int(num_ids), int(num_pos)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.classes = np.unique(self.rgb_labels)
        if not np.array_equal(self.classes, np.unique(self.ir_labels)):
            raise ConfigError("visible and infrared labels must cover the same identities")
        if self.num_ids < 1 or self.num_pos < 1:
            raise ConfigError("P (NUM_IDS) and K (NUM_POS) must be >= 1, got %d, %d" % (self.num_ids, self.num_pos))
        if self.num_ids > len(self.classes):
            raise ConfigError("P = %d identities per batch but only %d training identities" % (self.num_ids, len(self.classes)))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError("rank %d / world size %d" % (self.rank, self.world_size))
        if self.num_ids % self.world_size:
            raise ConfigError("P = %d identities per batch must be divisible by the world size %d"
                             % (self.num_ids, self.world_size))
        n = max(len(self.rgb_labels), len(self.ir_labels))
        self.num_iters = int(num_iters) if num_iters else n // (self.num_ids * self.num_pos) + 1
        self.epoch = 0
        self.generator = None
        self._index = {}
        for name, labels in (("rgb", self.rgb_labels), ("ir", self.ir_labels)):
            order = np.argsort(labels, kind="stable")
            counts = np.bincount(labels, minlength=int(self.classes.max()) + 1)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._index[name] = (order, counts, starts)

    @classmethod
    def from_config(cls, cfg, train_set, rank=0, world_size=1):
        vis = np.flatnonzero(train_set.modality == 0)
        ir = np.flatnonzero(train_set.modality == 1)
        return cls(train_set.pids[vis], train_set.pids[ir], cfg.DATALOADER.NUM_IDS, cfg.DATALOADER.NUM_POS,
                   seed=cfg.SEED, num_iters=int(cfg.SOLVER.ITERS_PER_EPOCH), rank=rank, world_size=world_size,
                   rgb_items=vis, ir_items=ir)

    @property
    def batch_size(self):
        """Pairs per batch on this rank."""
        return self.num_ids // self.world_size * self.num_pos

    def set_epoch(self, epoch):
        """Select the epoch's plan; also reseeds an attached DataLoader generator."""
        self.epoch = int(epoch)
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def plan(self, epoch=None):
        """Global plan: (visible items, infrared items, aug seeds), each [iters, P, K]."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        keys = rng.random((self.num_iters, len(self.classes)))
        ids = self.classes[np.argsort(keys, axis=1, kind="stable")[:, : self.num_ids]]
        picks = []
        for name, items in (("rgb", self.rgb_items), ("ir", self.ir_items)):
            order, counts, starts = self._index[name]
            offset = (rng.random((self.num_iters, self.num_ids, self.num_pos)) * counts[ids][..., None]).astype(np.int64)
            picks.append(items[order[starts[ids][..., None] + offset]])
        seeds = np.random.default_rng([self.seed, epoch, _AUG_STREAM]).integers(
            0, 2**62, size=(self.num_iters, self.num_ids, self.num_pos))
        return picks[0], picks[1], seeds

    def __iter__(self):
        rgb, ir, seeds = self.plan()
        per_rank = self.num_ids // self.world_size
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        rgb, ir, seeds = rgb[:, part].reshape(-1), ir[:, part].reshape(-1), seeds[:, part].reshape(-1)
        for i, j, s in zip(rgb.tolist(), ir.tolist(), seeds.tolist()):
            yield SamplePair(i, j, s)

    def __len__(self):
        return self.num_iters * self.batch_size

