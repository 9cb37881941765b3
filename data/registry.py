"""The dataset registry: ``DATASETS.get(cfg.DATASET.NAME)`` is a dataset class.

A dataset class subclasses :class:`data.datasets.base.ReIDDataset`, is built as ``cls(cfg)``
and registers itself with ``@DATASETS.register("name")``; the built-in ones (sysu, regdb,
llcm, demo) are imported on the first lookup.
"""
from utils.registry import Registry

DATASETS = Registry("dataset", "DATASET.NAME", modules=(
    "data.datasets.sysu", "data.datasets.regdb", "data.datasets.llcm", "data.datasets.demo",
    "data.datasets.market1501", "data.datasets.dukemtmc", "data.datasets.msmt17", "data.datasets.demo_market"))


def get_dataset(cfg):
    """The dataset of cfg.DATASET.NAME, built for `cfg`."""
    return DATASETS.get(cfg.DATASET.NAME)(cfg)
