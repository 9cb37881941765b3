"""RegDB: per-trial list files for training and testing.

Layout: ``Visible/<id>/*.bmp``, ``Thermal/<id>/*.bmp`` and, for trials t = 1..10,
``idx/{train,test}_{visible,thermal}_{t}.txt`` with ``<relative path> <label>`` lines.
Training uses the trial's train lists (labels must be contiguous); the test split of a
trial is its two test lists, the whole of each (no gallery sampling): ``vis2ir`` = visible
query -> thermal gallery (the released default), ``ir2vis`` the reverse. Identity numbers
are the list labels; cameras are 1 (visible) and 2 (thermal), as in ``eval_regdb``.
"""
import os

import numpy as np

from data.listfiles import read_label_list, require_root
from data.list_dataset import load_listed_training, read_training_lists
from data.datasets.base import ReIDDataset
from data.items import from_modality_arrays
from data.registry import DATASETS
from data.testsets import ImageList, TestSplit
from utils.config import ConfigError

LAYOUT = "Visible/<id>/*.bmp, Thermal/<id>/*.bmp and idx/{train,test}_{visible,thermal}_{1..10}.txt"
VISIBLE_CAM, THERMAL_CAM = 1, 2


def _trial(value, key):
    t = int(value)
    if not 1 <= t <= 10:
        raise ConfigError("%s must be a RegDB trial 1..10, got %r" % (key, value))
    return t


TRIALS = tuple(range(1, 11))


@DATASETS.register("regdb")
class RegDB(ReIDDataset):
    """RegDB, one trial's lists: 206 training identities x (10 visible + 10 thermal images),
    206 test identities (2,060 images per modality)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trial = _trial(cfg.DATASET.TRIAL, "DATASET.TRIAL")

    @classmethod
    def run_name(cls, cfg):
        return "regdb_trial%d" % cfg.DATASET.TRIAL

    @classmethod
    def test_runs(cls, cfg, trial=None):
        if trial is None:
            return [_trial(cfg.DATASET.TRIAL, "DATASET.TRIAL")]
        if trial == "all":
            return list(TRIALS)
        try:
            return [_trial(trial, "--trial")]
        except ValueError:
            raise ConfigError("--trial must be 1..10 or 'all', got %r" % trial) from None

    @classmethod
    def trial_config(cls, cfg, trial):
        if trial == cfg.DATASET.TRIAL:
            return cfg
        out = cfg.clone()
        out.defrost()
        out.DATASET.TRIAL = int(trial)
        out.freeze()
        return out

    @classmethod
    def result_tags(cls, cfg):
        return [cfg.TEST.DIRECTION]

    @classmethod
    def eval_info(cls, cfg):
        return {"trial": int(cfg.DATASET.TRIAL)}

    def train_items(self, size):
        rgb, rgb_lab, ir, ir_lab = self.train_images(size)
        return from_modality_arrays(rgb, rgb_lab, np.full(len(rgb_lab), VISIBLE_CAM),
                                    ir, ir_lab, np.full(len(ir_lab), THERMAL_CAM), "RegDB trial %d" % self.trial)

    def _list(self, split, word, trial):
        require_root(self.root, "RegDB", LAYOUT)
        return os.path.join(self.root, "idx", "%s_%s_%d.txt" % (split, word, trial))

    def train_images(self, size):
        return load_listed_training(self.root, self._list("train", "visible", self.trial),
                                    self._list("train", "thermal", self.trial), size, "RegDB",
                                    self.resample)

    def train_listing(self):
        (rgb, rgb_lab), (ir, ir_lab) = read_training_lists(
            self.root, self._list("train", "visible", self.trial), self._list("train", "thermal", self.trial))
        return (ImageList(rgb, rgb_lab, np.full(len(rgb), VISIBLE_CAM)),
                ImageList(ir, ir_lab, np.full(len(ir), THERMAL_CAM)))

    def test_split(self, cfg, trial=None):
        t = self.trial if trial is None else _trial(trial, "trial")
        lists = {}
        for word, cam in (("visible", VISIBLE_CAM), ("thermal", THERMAL_CAM)):
            rels, labels = read_label_list(self._list("test", word, t), self.root)
            lists[word] = ImageList([os.path.join(self.root, r) for r in rels], labels, np.full(len(rels), cam))
        if cfg.TEST.DIRECTION == "vis2ir":
            query, gallery, qmod, gmod = lists["visible"], lists["thermal"], "visible", "infrared"
        else:
            query, gallery, qmod, gmod = lists["thermal"], lists["visible"], "infrared", "visible"
        return TestSplit(
            query=query,
            gallery=gallery,
            trials=[np.arange(len(gallery), dtype=np.int64)],
            protocol="regdb",
            query_modality=qmod,
            gallery_modality=gmod,
            info={"dataset": "regdb", "root": self.root, "trial": t, "direction": cfg.TEST.DIRECTION,
                  "gallery": "all", "shots": None, "trials": [t], "num_query": len(query),
                  "num_gallery_candidates": len(gallery)},
        )
