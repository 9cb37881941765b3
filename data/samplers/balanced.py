"""The balanced identity sampler of IV-REID, registered as "balanced", and the chunked
identity rounds it shares with the PK sampler.

An epoch is built per identity, then in rounds:

1. for every identity, its infrared items and its visible items (in item order) are each
   shuffled; a modality with fewer than K items is first upsampled to K with replacement.
   The two lists are zipped into (infrared, visible) pairs (the longer list is cut to the
   shorter) and cut into chunks of K pairs; a last chunk of fewer than K pairs is dropped;
2. while at least P identities have chunks left, a round draws P of them without
   replacement and takes the next chunk of each, in the drawn order: one global batch of
   P identities x K pairs. The remaining chunks are dropped.

So no item repeats within an epoch unless its identity was upsampled, and the number of
batches varies from epoch to epoch (``__len__`` is that of the current epoch).

Two orders (``DATALOADER.BALANCED_ORDER``):

* ``seeded``: identities in ascending order, every draw from
  ``np.random.default_rng([SEED, epoch])``; an epoch's plan does not depend on what ran
  before.
* ``reference``: the released order: identities in the order of their first infrared item,
  shuffles and round draws from a private ``random.Random(SEED)``, upsampling from a private
  ``np.random.RandomState(SEED)``, both continued from one epoch to the next (per identity:
  upsample infrared, shuffle infrared, upsample visible, shuffle visible; then one
  ``sample`` per round). ``set_epoch(e)`` replays epochs 0..e-1 when it has to, so epoch e
  has the same order whatever this process iterated before.

With DDP, rank r of W takes the identities at positions r*P/W .. (r+1)*P/W - 1 of every
global batch. Items are :class:`data.samplers.base.SamplePair` ``(i_visible, i_infrared)`` of
training-set item numbers, each with an augmentation seed drawn per global position from
``default_rng([SEED, epoch, 1])``.
"""
import random
from collections import deque

import numpy as np
from torch.utils.data import Sampler

from data.errors import DatasetError
from data.samplers.base import SamplePair, epoch_seed
from data.samplers.registry import SAMPLERS
from utils.errors import ConfigError

_AUG_STREAM = 1
VISIBLE, INFRARED = 0, 1


class SeededDraws:
    """The random draws of one epoch, all from ``np.random.default_rng([seed, epoch])``."""

    def __init__(self, seed, epoch):
        self.rng = np.random.default_rng([int(seed), int(epoch)])

    def upsample(self, items, k):
        return self.rng.choice(items, size=k, replace=True).tolist()

    def shuffle(self, items):
        self.rng.shuffle(items)

    def sample(self, population, k):
        return [population[i] for i in self.rng.choice(len(population), size=k, replace=False).tolist()]


class ReferenceDraws:
    """The released draws: Python ``random`` shuffles and samples, numpy's legacy generator
    upsamples; private streams seeded once with `seed`."""

    def __init__(self, seed):
        self.py = random.Random(int(seed))
        self.np = np.random.RandomState(int(seed))

    def upsample(self, items, k):
        return self.np.choice(items, size=k, replace=True).tolist()

    def shuffle(self, items):
        self.py.shuffle(items)

    def sample(self, population, k):
        return self.py.sample(population, k)


def identity_rounds(ids, streams, num_ids, num_pos, draws):
    """The chunked identity rounds of one epoch (module docstring, steps 1 and 2).

    ids: the identities in their base order; streams: ``{pid: [items of stream 0, items of
    stream 1, ...]}`` (one stream per modality; each upsampled and shuffled in that order);
    draws: :class:`SeededDraws` or :class:`ReferenceDraws`.
    Returns int64 [rounds, num_ids, num_pos, number of streams]: item numbers, [r, p, j, m]
    being stream m of tuple j of the p-th identity drawn in round r.
    """
    width = len(streams[ids[0]])
    chunks = {}
    for pid in ids:
        lists = []
        for items in streams[pid]:
            items = list(items)
            if len(items) < num_pos:
                items = draws.upsample(items, num_pos)
            draws.shuffle(items)
            lists.append(items)
        tuples = list(zip(*lists))
        chunks[pid] = deque(tuples[s:s + num_pos] for s in range(0, len(tuples) - num_pos + 1, num_pos))
    available, rounds = list(ids), []
    while len(available) >= num_ids:
        batch = []
        for pid in draws.sample(available, num_ids):
            batch.append(chunks[pid].popleft())
            if not chunks[pid]:
                available.remove(pid)
        rounds.append(batch)
    return np.asarray(rounds, dtype=np.int64).reshape(len(rounds), num_ids, num_pos, width)


def items_by_identity(pids, items):
    """``{pid: item numbers of `items` with that pid, in item order}`` for int64 arrays."""
    order = np.argsort(pids[items], kind="stable")
    ids, starts = np.unique(pids[items][order], return_index=True)
    return {int(pid): block.tolist() for pid, block in zip(ids, np.split(items[order], starts[1:]))}


def check_epoch_length(cfg):
    """ConfigError when SOLVER.ITERS_PER_EPOCH asks for a fixed epoch length: these epochs end
    with the identities' chunks."""
    if int(cfg.SOLVER.ITERS_PER_EPOCH):
        raise ConfigError("SOLVER.ITERS_PER_EPOCH = %d, but a DATALOADER.SAMPLER %s epoch ends when fewer than "
                          "NUM_IDS identities have items left; set it to 0"
                          % (cfg.SOLVER.ITERS_PER_EPOCH, cfg.DATALOADER.SAMPLER))


class IdentityRoundSampler(Sampler):
    """What the chunked identity samplers share: P identities x K per global batch, sharded by
    identity position across DDP ranks, one plan per epoch (subclasses draw the rounds)."""

    def __init__(self, num_classes, num_ids, num_pos, seed, rank, world_size):
        self.num_ids, self.num_pos = int(num_ids), int(num_pos)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if self.num_ids < 1 or self.num_pos < 1:
            raise ConfigError("DATALOADER.NUM_IDS (P) and NUM_POS (K) must be >= 1, got %d, %d"
                              % (self.num_ids, self.num_pos))
        if self.num_ids > num_classes:
            raise ConfigError("DATALOADER.NUM_IDS = %d identities per batch but only %d training identities"
                              % (self.num_ids, num_classes))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError("rank %d / world size %d" % (self.rank, self.world_size))
        if self.num_ids % self.world_size:
            raise ConfigError("DATALOADER.NUM_IDS = %d identities per batch must be divisible by the world size %d"
                              % (self.num_ids, self.world_size))
        self.generator = None
        self.epoch = None
        self._rounds = None

    def draw_rounds(self, epoch):
        """[rounds, P, K, streams] item numbers of `epoch` (see :func:`identity_rounds`)."""
        raise NotImplementedError

    @property
    def batch_size(self):
        """Items per batch on this rank."""
        return self.num_ids // self.world_size * self.num_pos

    def set_epoch(self, epoch):
        """Select the epoch's plan; also reseeds an attached DataLoader generator."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._rounds = self.draw_rounds(epoch)
        self.epoch = epoch
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def rounds(self, epoch=None):
        """The global rounds [rounds, P, K, streams] of `epoch` (default: the current one) and
        their augmentation seeds [rounds, P, K]."""
        epoch = self.epoch if epoch is None else int(epoch)
        rounds = self._rounds if epoch == self.epoch else self.draw_rounds(epoch)
        seeds = np.random.default_rng([self.seed, epoch, _AUG_STREAM]).integers(0, 2**62, size=rounds.shape[:3])
        return rounds, seeds

    def rank_share(self, epoch=None):
        """This rank's items [n, streams] and seeds [n] of `epoch`, in yield order."""
        rounds, seeds = self.rounds(epoch)
        per_rank = self.num_ids // self.world_size
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return rounds[:, part].reshape(-1, rounds.shape[3]), seeds[:, part].reshape(-1)

    def __len__(self):
        return len(self._rounds) * self.batch_size


@SAMPLERS.register("balanced")
class BalancedSampler(IdentityRoundSampler):
    """P identities x K (visible, infrared) pairs per batch without replacement; see the
    module docstring. ``pids``, ``modality`` [N]: identity and modality (0 visible,
    1 infrared) of every training item."""

    collate = "paired"

    def __init__(self, pids, modality, num_ids, num_pos, seed=0, order="seeded", rank=0, world_size=1):
        pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        modality = np.asarray(modality, dtype=np.int64).reshape(-1)
        if len(pids) != len(modality):
            raise ValueError("balanced sampler: %d pids but %d modality entries" % (len(pids), len(modality)))
        if order not in ("seeded", "reference"):
            raise ConfigError("DATALOADER.BALANCED_ORDER must be seeded or reference, got %r" % (order,))
        odd = sorted(set(modality.tolist()) - {VISIBLE, INFRARED})
        if odd:
            raise DatasetError("balanced sampler: modality must be 0 (visible) or 1 (infrared), got %s" % odd)
        infrared = items_by_identity(pids, np.flatnonzero(modality == INFRARED))
        visible = items_by_identity(pids, np.flatnonzero(modality == VISIBLE))
        lacking = [(name, sorted(set(b) - set(a))) for name, a, b in
                   (("infrared", infrared, visible), ("visible", visible, infrared))]
        lacking = ["no %s images for ids %s" % (name, ids[:10]) for name, ids in lacking if ids]
        if lacking:
            raise DatasetError("balanced sampler: every training identity needs visible and infrared images; %s"
                               % "; ".join(lacking))
        super().__init__(len(infrared), num_ids, num_pos, seed, rank, world_size)
        self.order = order
        ir_items = np.flatnonzero(modality == INFRARED)
        if order == "reference":
            first = np.unique(pids[ir_items], return_index=True)[1]
            self.ids = pids[ir_items][np.sort(first)].tolist()
        else:
            self.ids = sorted(infrared)
        # infrared first: the released code draws for an identity's infrared list first
        self.streams = {pid: (infrared[pid], visible[pid]) for pid in self.ids}
        self._stream, self._stream_next = None, 0
        self.set_epoch(0)

    @classmethod
    def from_config(cls, cfg, train_set, rank=0, world_size=1):
        check_epoch_length(cfg)
        return cls(train_set.pids, train_set.modality, cfg.DATALOADER.NUM_IDS, cfg.DATALOADER.NUM_POS, seed=cfg.SEED,
                   order=cfg.DATALOADER.BALANCED_ORDER, rank=rank, world_size=world_size)

    def draw_rounds(self, epoch):
        if self.order == "seeded":
            return identity_rounds(self.ids, self.streams, self.num_ids, self.num_pos, SeededDraws(self.seed, epoch))
        # The reference streams continue across epochs: restart them when asked for an epoch
        # they have passed, then run the epochs in between.
        if self._stream is None or self._stream_next > epoch:
            self._stream, self._stream_next = ReferenceDraws(self.seed), 0
        while True:
            rounds = identity_rounds(self.ids, self.streams, self.num_ids, self.num_pos, self._stream)
            self._stream_next += 1
            if self._stream_next > epoch:
                return rounds

    def plan(self, epoch=None):
        """Global plan of `epoch` (default: the current one): (visible items, infrared items,
        augmentation seeds), each [batches, P, K]; [b, p, j] is pair j of the p-th identity
        of batch b."""
        rounds, seeds = self.rounds(epoch)
        return rounds[..., 1], rounds[..., 0], seeds

    def __iter__(self):
        items, seeds = self.rank_share()
        for (i_ir, i_vis), s in zip(items.tolist(), seeds.tolist()):
            yield SamplePair(i_vis, i_ir, s)
