"""The training DataLoader: the configured sampler, per-rank batches, seeded workers.

``build_train_loader(cfg, rank, world_size)`` -> ``(loader, sampler, train_set)``. Each batch
is a dict (``images``, ``pids``, ``camids``, ``modality``, ``index``; layout of
:mod:`data.samplers.base`), one rank's share of a global batch. Call
``sampler.set_epoch(epoch)`` before iterating an epoch; it also reseeds the loader's
``generator`` (worker seeds) from (cfg.SEED, epoch).
"""
import torch
from torch.utils.data import DataLoader

from data.samplers.base import COLLATE
from data.samplers.registry import SAMPLERS
from data.train_set import build_train_set
from utils.errors import ConfigError


def build_train_loader(cfg, rank=0, world_size=1):
    train_set = build_train_set(cfg)
    num_ids = int(cfg.DATALOADER.NUM_IDS)
    if num_ids % world_size:
        raise ConfigError("DATALOADER.NUM_IDS = %d must be divisible by the world size %d" % (num_ids, world_size))
    sampler = SAMPLERS.get(cfg.DATALOADER.SAMPLER).from_config(cfg, train_set, rank, world_size)
    generator = torch.Generator()
    sampler.generator = generator
    sampler.set_epoch(0)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    loader = DataLoader(
        train_set,
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=COLLATE[sampler.collate],
        num_workers=workers,
        pin_memory=bool(cfg.DATALOADER.PIN_MEMORY) and torch.cuda.is_available(),
        persistent_workers=bool(cfg.DATALOADER.PERSISTENT_WORKERS) and workers > 0,
        generator=generator,
    )
    return loader, sampler, train_set
