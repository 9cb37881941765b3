"""The training DataLoader: cross-modality sampler, per-rank batches, seeded workers.

``build_train_loader(cfg, rank, world_size)`` -> ``(loader, sampler, train_set)``. Each batch
is ``(img_v [P*K/W, 3, H, W], img_i, label_v [P*K/W] int64, label_i)``, one rank's share of a
global batch (spec ``training_recipe.md`` 3.3). Call ``sampler.set_epoch(epoch)`` before
iterating an epoch; it also reseeds the loader's ``generator`` (worker seeds) from
(cfg.SEED, epoch). ``len(loader)`` = SOLVER.ITERS_PER_EPOCH or int(N / (P*K)) + 1.
"""
import torch
from torch.utils.data import DataLoader

from data.sampler import CrossModalitySampler
from data.train_set import build_train_set
from utils.config import ConfigError


def build_train_loader(cfg, rank=0, world_size=1):
    train_set = build_train_set(cfg)
    num_ids, num_pos = int(cfg.DATALOADER.NUM_IDS), int(cfg.DATALOADER.NUM_POS)
    if num_ids % world_size:
        raise ConfigError("DATALOADER.NUM_IDS = %d must be divisible by the world size %d" % (num_ids, world_size))
    sampler = CrossModalitySampler(
        train_set.rgb_labels, train_set.ir_labels, num_ids, num_pos, seed=cfg.SEED,
        num_iters=int(cfg.SOLVER.ITERS_PER_EPOCH), rank=rank, world_size=world_size,
    )
    generator = torch.Generator()
    sampler.generator = generator
    sampler.set_epoch(0)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    loader = DataLoader(
        train_set,
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=bool(cfg.DATALOADER.PIN_MEMORY) and torch.cuda.is_available(),
        persistent_workers=bool(cfg.DATALOADER.PERSISTENT_WORKERS) and workers > 0,
        generator=generator,
    )
    return loader, sampler, train_set
