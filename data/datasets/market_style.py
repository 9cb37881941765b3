"""Single-modality ReID datasets whose file names carry the identity and camera.

Market-1501, DukeMTMC-reID and MSMT17 share one shape: a training split, a query split and
a gallery split, each a list of (image path, person id, camera id); every image is visible
(modality 0). :class:`MarketStyleDataset` turns the three lists a subclass reads into the
dataset contract of ``data/datasets/base.py``:

* training: person ids relabelled to 0..C-1 (:func:`train_labels`), cameras 0-based;
  ``train_items(size)`` decodes every training image once at (W, H) with
  INPUT.RESIZE_FILTER into memory; ``num_cameras`` is the number of distinct training
  cameras (what the released code passes to the camera embedding as the camera count);
* test: one query list against one gallery (no gallery trials), protocol ``market``
  (gallery items of the query's identity seen by the query's camera are removed; the raw
  person ids and cameras are kept, distractors with pid 0 included).

:class:`FolderDataset` is the Market-1501 / DukeMTMC-reID layout: ``bounding_box_train/``,
``query/`` and ``bounding_box_test/`` folders of ``*.jpg`` files named
``<pid>_c<camera>...`` (``0002_c1s1_000451_03.jpg``, ``0005_c2_f0046182.jpg``). The pid and
camera are read from the file name only, never from the rest of the path (a root such as
``/data/0001_c1/`` parses like any other). Files with pid -1 (Market-1501's junk boxes) are
dropped from every split as the released parsers do; pid 0 (Market-1501's distractors) is
an ordinary identity. Every split is walked in sorted file-name order.

Relabelling (DATASET.RELABEL): ``set`` (default) gives each training pid its position in the
iteration order of a CPython set built from the pids in walk order, the released rule
(``data/set_order.py``): ascending for the full Market-1501 training set (751 pids, all
below 2048), a permutation of ascending for DukeMTMC-reID and for small subsets; ``sorted``
gives each its rank among the training pids. Query and gallery keep the raw pids.
"""
import os
import re

import numpy as np

from data.errors import DatasetError
from data.image_io import decode_resized
from data.items import ArrayImages, TrainItems
from data.datasets.base import ReIDDataset
from data.set_order import set_order_labels
from data.testsets import ImageList, TestSplit
from utils.errors import ConfigError

RELABEL_RULES = ("set", "sorted")
JUNK_PID = -1
# <pid>_c<camera digit> at the start of the name; the pid is digits or -1 (junk).
_NAME = re.compile(r"^(-1|\d+)_c(\d)")
# Show a progress bar only when decoding takes noticeable time.
_PROGRESS_MIN_IMAGES = 2000


def train_labels(pids, rule="set"):
    """``{pid: label}`` of the training pids (walk order, repeats allowed) under `rule`."""
    if rule == "set":
        return set_order_labels(pids)
    if rule == "sorted":
        return {pid: i for i, pid in enumerate(sorted(set(pids)))}
    raise ConfigError("DATASET.RELABEL must be one of %s, got %r" % (", ".join(RELABEL_RULES), rule))


def relabel_rule(cfg):
    """DATASET.RELABEL, checked."""
    rule = cfg.DATASET.RELABEL
    if rule not in RELABEL_RULES:
        raise ConfigError("DATASET.RELABEL must be one of %s, got %r" % (", ".join(RELABEL_RULES), rule))
    return rule


class Rows:
    """One split as parallel lists: absolute paths, raw person ids, 0-based camera ids."""

    def __init__(self, paths=(), pids=(), camids=()):
        self.paths, self.pids, self.camids = list(paths), [int(p) for p in pids], [int(c) for c in camids]

    def __len__(self):
        return len(self.paths)

    def image_list(self, labels=None):
        pids = self.pids if labels is None else [labels[p] for p in self.pids]
        return ImageList(self.paths, pids, self.camids)


def parse_folder_name(name, num_cams, folder):
    """(pid, 0-based camera) of a ``<pid>_c<camera>...`` file name; DatasetError otherwise."""
    match = _NAME.match(name)
    if match is None:
        raise DatasetError("%s: file name %r does not start with '<pid>_c<camera>' (e.g. 0002_c1s1_000451_03.jpg)"
                           % (folder, name))
    pid, cam = int(match.group(1)), int(match.group(2))
    if not 1 <= cam <= num_cams:
        raise DatasetError("%s: file %r names camera c%d, expected c1..c%d" % (folder, name, cam, num_cams))
    return pid, cam - 1


def read_folder(folder, num_cams, what):
    """Rows of every ``*.jpg`` in `folder` (sorted names), junk (pid -1) dropped.

    Returns (rows, number of junk files dropped)."""
    if not os.path.isdir(folder):
        raise DatasetError("%s folder not found: %s" % (what, folder))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg") and not n.startswith("."))
    if not names:
        raise DatasetError("%s folder %s holds no .jpg images" % (what, folder))
    rows, junk = Rows(), 0
    for name in names:
        pid, cam = parse_folder_name(name, num_cams, folder)
        if pid == JUNK_PID:
            junk += 1
            continue
        rows.paths.append(os.path.join(folder, name))
        rows.pids.append(pid)
        rows.camids.append(cam)
    if not rows.paths:
        raise DatasetError("%s folder %s holds only junk images (pid -1)" % (what, folder))
    return rows, junk


class MarketStyleDataset(ReIDDataset):
    """The contract for a dataset given by three :class:`Rows` (module docstring).

    Subclasses define ``DISPLAY`` (the name in messages) and ``_read(split)`` for split in
    ``train``, ``query``, ``gallery``, returning (Rows, number of junk files dropped); one
    whose training pids are labels already overrides :meth:`labels`.
    """

    DISPLAY = "dataset"
    # The pid of distractor images (ordinary negatives counted apart in the split info), if any.
    DISTRACTOR_PID = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.DATASET.NAME
        self.relabel = relabel_rule(cfg)
        self._rows = {}

    @classmethod
    def test_runs(cls, cfg, trial=None):
        if trial is not None:
            raise ConfigError("--trial applies to RegDB's list trials only; %s has one query/gallery split"
                              % cfg.DATASET.NAME)
        return [None]

    @classmethod
    def result_tags(cls, cfg):
        return []

    @classmethod
    def eval_info(cls, cfg):
        return {}

    def rows(self, split):
        """(Rows, junk dropped) of `split` (``train``, ``query`` or ``gallery``), read once."""
        if split not in self._rows:
            self._rows[split] = self._read(split)
        return self._rows[split]

    def _read(self, split):
        raise NotImplementedError

    def labels(self):
        """``{raw training pid: label}``."""
        return train_labels(self.rows("train")[0].pids, self.relabel)

    @property
    def num_cameras(self):
        """Distinct camera ids of the training images (the released camera count)."""
        return len(set(self.rows("train")[0].camids))

    @property
    def train_cameras(self):
        """The sorted distinct 0-based camera ids of the training images."""
        return tuple(sorted(set(self.rows("train")[0].camids)))

    def train_listing(self):
        """(visible ImageList with the training labels as pids, empty infrared ImageList)."""
        return self.rows("train")[0].image_list(self.labels()), ImageList([], [], [])

    def train_items(self, size):
        train = self.train_listing()[0]
        desc = "%s %dx%d" % (self.DISPLAY, size[0], size[1]) if len(train) >= _PROGRESS_MIN_IMAGES else None
        images = decode_resized(train.paths, size, progress=desc, resample=self.resample)
        return TrainItems(images=ArrayImages([images]), pids=train.pids, camids=train.camids,
                          modality=np.zeros(len(train), np.int64))

    def test_split(self, cfg, trial=None):
        """Query -> gallery, protocol ``market``, one trial over the whole gallery.

        TEST.DIRECTION / GALLERY / SHOTS / NUM_TRIALS do not apply (single modality, one
        fixed gallery)."""
        if trial is not None:
            self.test_runs(cfg, trial)
        (query, _), (gallery, junk) = self.rows("query"), self.rows("gallery")
        info = {"dataset": self.name, "root": self.root, "gallery": "all", "num_query": len(query),
                "num_gallery_candidates": len(gallery), "num_query_ids": len(set(query.pids)),
                "num_gallery_ids": len(set(gallery.pids)), "junk_dropped": junk}
        if self.DISTRACTOR_PID is not None:
            info["num_distractors"] = gallery.pids.count(self.DISTRACTOR_PID)
        return TestSplit(
            query=query.image_list(),
            gallery=gallery.image_list(),
            trials=[np.arange(len(gallery), dtype=np.int64)],
            protocol="market",
            query_modality="visible",
            gallery_modality="visible",
            info=info,
        )


class FolderDataset(MarketStyleDataset):
    """``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of ``<pid>_c<cam>...jpg``
    files (module docstring); subclasses set ``DISPLAY`` and ``NUM_CAMS``."""

    NUM_CAMS = 9  # the name holds one camera digit; subclasses narrow c1..c9 to their cameras
    FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def _read(self, split):
        if not os.path.isdir(self.root):
            raise DatasetError("%s root not found: %s (expected bounding_box_train/, query/ and bounding_box_test/ "
                               "with <pid>_c<camera>*.jpg files; see datasets/README.md)" % (self.DISPLAY, self.root))
        return read_folder(os.path.join(self.root, self.FOLDERS[split]), self.NUM_CAMS, "%s %s" % (self.DISPLAY, split))
