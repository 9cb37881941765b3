"""Cross-modality identity sampler (spec ``datasets_and_protocols.md`` 2.1, ``training_recipe.md`` 3.3).

Every global batch holds P distinct identities (drawn without replacement) and, for each in
order, K visible and K infrared indices drawn uniformly with replacement; visible and
infrared are aligned by position (same identity at the same place), identities grouped in
runs of K. An epoch has ``num_iters`` batches (default: the released int(N / (P*K)) + 1 with
N the larger modality).

The plan of an epoch comes from ``np.random.default_rng([seed, epoch])`` alone, so it is
the same whatever ran before. With DDP, rank r of W takes identities r*P/W .. (r+1)*P/W - 1
of every global batch: the ranks' batches are disjoint and together form the global batch.

Items are :class:`SamplePair` (a 2-tuple ``(i_rgb, i_ir)``) carrying ``.seed``, an
augmentation seed drawn per global position from ``default_rng([seed, epoch, 1])``; the
training set seeds each pair's transforms with it, which makes an augmented batch
independent of the number of workers and of the world size.
"""
import numpy as np
from torch.utils.data import Sampler

_AUG_STREAM = 1


class SamplePair(tuple):
    """``(i_rgb, i_ir)`` with the augmentation seed of this sample as ``.seed``."""

    def __new__(cls, i_rgb, i_ir, seed=None):
        obj = super().__new__(cls, (int(i_rgb), int(i_ir)))
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SamplePair, (self[0], self[1], self.seed))


class CrossModalitySampler(Sampler):
    """P identities x K visible + K infrared per batch; see the module docstring."""

    def __init__(self, rgb_labels, ir_labels, num_ids, num_pos, seed=0, num_iters=0, rank=0, world_size=1):
        self.rgb_labels = np.asarray(rgb_labels, dtype=np.int64)
        self.ir_labels = np.asarray(ir_labels, dtype=np.int64)
        self.num_ids, self.num_pos = int(num_ids), int(num_pos)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.classes = np.unique(self.rgb_labels)
        if not np.array_equal(self.classes, np.unique(self.ir_labels)):
            raise ValueError("visible and infrared labels must cover the same identities")
        if self.num_ids < 1 or self.num_pos < 1:
            raise ValueError("P (NUM_IDS) and K (NUM_POS) must be >= 1, got %d, %d" % (self.num_ids, self.num_pos))
        if self.num_ids > len(self.classes):
            raise ValueError("P = %d identities per batch but only %d training identities" % (self.num_ids, len(self.classes)))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError("rank %d / world size %d" % (self.rank, self.world_size))
        if self.num_ids % self.world_size:
            raise ValueError("P = %d identities per batch must be divisible by the world size %d"
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
        """Global plan: (rgb indices, ir indices, aug seeds), each [iters, P, K]."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        keys = rng.random((self.num_iters, len(self.classes)))
        ids = self.classes[np.argsort(keys, axis=1, kind="stable")[:, : self.num_ids]]
        picks = []
        for name in ("rgb", "ir"):
            order, counts, starts = self._index[name]
            offset = (rng.random((self.num_iters, self.num_ids, self.num_pos)) * counts[ids][..., None]).astype(np.int64)
            picks.append(order[starts[ids][..., None] + offset])
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


def epoch_seed(seed, epoch):
    """A 63-bit seed derived from (seed, epoch) for torch generators."""
    return int(np.random.default_rng([int(seed), int(epoch), 2]).integers(0, 2**63 - 1))
