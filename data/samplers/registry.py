"""The sampler registry: ``SAMPLERS.get(cfg.DATALOADER.SAMPLER)`` is a sampler class.

A sampler is built as ``cls.from_config(cfg, train_set, rank, world_size)`` and follows the
contract of :mod:`data.samplers.base`.
"""
from utils.registry import Registry

SAMPLERS = Registry("sampler", "DATALOADER.SAMPLER", modules=(
    "data.samplers.cross_modality", "data.samplers.balanced", "data.samplers.pk",
    "data.samplers.multiple_gallery"))
