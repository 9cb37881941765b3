"""Dataset registry: ``DATASETS`` maps cfg.DATASET.NAME to a dataset class.

A dataset class is built as ``cls(cfg)`` and provides:

* ``train_images(size)`` -> ``(rgb [N, H, W, 3] uint8, rgb_labels, ir [M, H, W, 3] uint8,
  ir_labels)`` at ``size`` = (W, H) (arrays may be memory-mapped);
* ``train_listing()`` -> ``(rgb ImageList, ir ImageList)`` of the training images with their
  training labels as pids (used for the held-out validation split);
* ``test_split(cfg, trial)`` -> :class:`data.testsets.TestSplit`.

New datasets register with ``@register("name")``; the built-in ones (sysu, regdb, llcm,
demo) are imported on first lookup.
"""
import importlib

from utils.config import ConfigError

DATASETS = {}
BUILTIN_MODULES = ("data.sysu", "data.regdb", "data.llcm", "data.demo")


def load_builtin_datasets():
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def register(name):
    def wrap(cls):
        DATASETS[name] = cls
        return cls

    return wrap


def get_dataset(cfg):
    load_builtin_datasets()
    name = cfg.DATASET.NAME
    if name not in DATASETS:
        raise ConfigError("DATASET.NAME %r is not registered; available: %s" % (name, ", ".join(sorted(DATASETS))))
    return DATASETS[name](cfg)
