"""The dataset contract: what a registered dataset class provides.

A dataset class is built as ``cls(cfg)`` and gives

* ``train_items(size)`` -> :class:`data.items.TrainItems` at ``size`` = (W, H): every
  training image with its label (0..C-1), camera and modality (visible items first);
* ``train_listing()`` -> ``(visible ImageList, infrared ImageList)`` of the training files
  with their labels as pids (the held-out validation split reads it);
* ``test_split(cfg, trial)`` -> :class:`data.testsets.TestSplit`.

and, as class methods taking the config, what differs between datasets in the scripts:

* ``prepare(cfg)``: run once on the main process before any process reads the data
  (the demo dataset generates its files there); nothing by default;
* ``run_name(cfg)``: the run directory's name under ``runs/`` (RegDB: ``regdb_trial<N>``);
* ``test_runs(cfg, trial)``: the splits test.py evaluates, as a list of trial values for
  ``test_split`` (``[None]``: the configured split with its gallery trials; RegDB: one list
  trial, or all ten for ``--trial all``); ``trial`` is test.py's ``--trial`` argument;
* ``trial_config(cfg, trial)``: the config of one of those runs (RegDB: DATASET.TRIAL set);
* ``result_tags(cfg)``: the protocol words of a result file name (``all_seeded_1shot``);
* ``eval_info(cfg)``: what the in-training evaluation records about the split.
"""
from utils.errors import ConfigError


class ReIDDataset:
    """Defaults for the class methods of the contract (module docstring)."""

    def __init__(self, cfg):
        self.root = cfg.DATASET.ROOT
        self.resample = cfg.INPUT.RESIZE_FILTER

    @classmethod
    def prepare(cls, cfg):
        return None

    @classmethod
    def run_name(cls, cfg):
        return cfg.DATASET.NAME

    @classmethod
    def test_runs(cls, cfg, trial=None):
        if trial is not None:
            raise ConfigError("--trial applies to RegDB's list trials only (dataset is %s; its gallery trials are "
                              "set by --num-trials)" % cfg.DATASET.NAME)
        return [None]

    @classmethod
    def trial_config(cls, cfg, trial):
        return cfg

    @classmethod
    def result_tags(cls, cfg):
        tags = []
        if cfg.TEST.DIRECTION != "ir2vis":
            tags.append(cfg.TEST.DIRECTION)
        return tags + [cfg.TEST.GALLERY, "%dshot" % cfg.TEST.SHOTS]

    @classmethod
    def eval_info(cls, cfg):
        return {"gallery_trial": 0}
