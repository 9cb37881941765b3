"""The PK identity sampler of single-modality re-identification, registered as "pk".

Every global batch holds P distinct identities with K items each (torchreid's
RandomIdentitySampler law): per epoch, each identity's items (of any modality) are shuffled
(upsampled to K with replacement when it has fewer) and cut into chunks of K, a last shorter
chunk dropped; while at least P identities have chunks left, a round draws P of them without
replacement and takes the next chunk of each. Every draw comes from
``np.random.default_rng([SEED, epoch])``, so an epoch's plan does not depend on what ran
before, and ``__len__`` is the current epoch's true length.

With DDP, rank r of W takes the identities at positions r*P/W .. (r+1)*P/W - 1 of every
global batch. Items are :class:`data.samplers.base.SampleIndex` training-set item numbers,
each with an augmentation seed drawn per global position from ``default_rng([SEED, epoch, 1])``.
"""
import numpy as np

from data.samplers.balanced import (IdentityRoundSampler, SeededDraws, check_epoch_length, identity_rounds,
                                   items_by_identity)
from data.samplers.base import SampleIndex
from data.samplers.registry import SAMPLERS


@SAMPLERS.register("pk")
class PKSampler(IdentityRoundSampler):
    """P identities x K items per batch; see the module docstring. ``pids`` [N]: identity of
    every training item."""

    collate = "single"

    def __init__(self, pids, num_ids, num_pos, seed=0, rank=0, world_size=1):
        pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        members = items_by_identity(pids, np.arange(len(pids)))
        super().__init__(len(members), num_ids, num_pos, seed, rank, world_size)
        self.ids = sorted(members)
        self.streams = {pid: (items,) for pid, items in members.items()}
        self.set_epoch(0)

    @classmethod
    def from_config(cls, cfg, train_set, rank=0, world_size=1):
        check_epoch_length(cfg)
        return cls(train_set.pids, cfg.DATALOADER.NUM_IDS, cfg.DATALOADER.NUM_POS, seed=cfg.SEED,
                   rank=rank, world_size=world_size)

    def draw_rounds(self, epoch):
        return identity_rounds(self.ids, self.streams, self.num_ids, self.num_pos, SeededDraws(self.seed, epoch))

    def plan(self, epoch=None):
        """Global plan of `epoch` (default: the current one): (items, augmentation seeds), each
        [batches, P, K]."""
        rounds, seeds = self.rounds(epoch)
        return rounds[..., 0], seeds

    def __iter__(self):
        items, seeds = self.rank_share()
        for i, s in zip(items[:, 0].tolist(), seeds.tolist()):
            yield SampleIndex(i, s)
