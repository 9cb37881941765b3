"""Datasets, sampling and transforms for visible-infrared person re-identification.

Public API (the contracts are described in ``docs/architecture.md``):

* ``build_train_set(cfg)``, ``build_train_loader(cfg, rank, world_size)``, ``TrainItems``,
  ``SAMPLERS`` (name -> sampler class), ``CrossModalitySampler``, ``SamplePair``,
  ``SampleIndex``;
* ``build_test_split(cfg, trial)``, ``build_val_split(cfg)``, ``TestSplit``, ``ImageList``,
  ``TestImageDataset``;
* ``ensure_demo_dataset(cfg)``, ``preprocess_sysu(root, size, workers)``;
* ``DATASETS`` (name -> dataset class: sysu, regdb, llcm, demo), ``get_dataset(cfg)``,
  ``DatasetError``.

Names are imported on first access, so light tools (``pre_process_sysu.py``,
``tools/make_synthetic_dataset.py``) do not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "DATASETS": "data.registry",
    "get_dataset": "data.registry",
    "SAMPLERS": "data.samplers.registry",
    "SampleIndex": "data.samplers.base",
    "TrainItems": "data.items",
    "DatasetError": "data.errors",
    "ensure_demo_dataset": "data.datasets.demo",
    "TestImageDataset": "data.image_dataset",
    "build_train_loader": "data.loader",
    "CrossModalitySampler": "data.samplers.cross_modality",
    "SamplePair": "data.samplers.base",
    "preprocess_sysu": "data.datasets.sysu",
    "ImageList": "data.testsets",
    "TestSplit": "data.testsets",
    "build_test_split": "data.testsets",
    "build_val_split": "data.testsets",
    "TrainSet": "data.train_set",
    "build_train_set": "data.train_set",
    "TestTransform": "data.transforms",
    "TrainTransform": "data.transforms",
    "build_train_transforms": "data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError("module 'data' has no attribute %r" % name)
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
