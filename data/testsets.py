"""Test and validation splits: query and gallery image lists plus the per-trial gallery subsets.

A :class:`TestSplit` lists every gallery candidate once; each trial is an int64 array of
indices into that list (features are extracted once and a trial is a column subset of one
similarity matrix).

Gallery sampling rules (SYSU-MM01 and LLCM, per (identity, camera) group, groups walked in
sorted-id order and the dataset's camera order, files in sorted order):

* ``seeded`` single-shot (released): ``random.seed(trial)`` then ``random.choice(files)``.
* ``seeded`` multi-shot: ``random.seed(trial)`` then ``random.sample(files, min(shots, n))``.
* ``seeded_cam_major`` (SYSU, released IV-REID): the same draws with the groups walked
  camera-major instead: cameras in the mode's order (1, 2, 4, 5 or indoor 1, 2), inside a
  camera the ids in sorted order.
* ``official`` (SYSU ``exp/rand_perm_cam.mat``): the first ``shots`` numbers of row ``trial``
  of that identity's permutation in that camera name the files ``%04d.jpg``.

(identity, camera) folders without images contribute nothing (the released code would fail
on them). The seeds of the seeded trials are ``TEST.TRIAL_SEEDS``, or 0..TEST.NUM_TRIALS-1
when that list is empty.

``build_test_split(cfg, trial)`` and ``build_val_split(cfg)`` dispatch to the dataset
registered under ``cfg.DATASET.NAME`` (``data/registry.py``).
"""
import random
from dataclasses import dataclass, field

import numpy as np

from data.errors import DatasetError
from utils.config import ConfigError

DIRECTIONS = ("ir2vis", "vis2ir")
GALLERIES = ("seeded", "official", "seeded_cam_major")


@dataclass
class ImageList:
    """Image paths with their identity and camera numbers (int64 arrays of the same length)."""

    paths: list
    pids: np.ndarray
    camids: np.ndarray

    def __post_init__(self):
        self.paths = list(self.paths)
        self.pids = np.asarray(self.pids, dtype=np.int64).reshape(-1)
        self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
        if not len(self.paths) == len(self.pids) == len(self.camids):
            raise ValueError("ImageList: %d paths, %d pids, %d camids" % (len(self.paths), len(self.pids), len(self.camids)))

    def __len__(self):
        return len(self.paths)


@dataclass
class TestSplit:
    """Query images, all gallery candidates, and each trial's gallery as indices into them."""

    __test__ = False  # not a pytest test class

    query: ImageList
    gallery: ImageList
    trials: list
    protocol: str
    query_modality: str
    gallery_modality: str
    info: dict = field(default_factory=dict)


@dataclass
class GalleryGroup:
    """The gallery candidates of one (identity, camera): their indices and file names."""

    pid: int
    cam: int
    indices: list
    names: list


class ListBuilder:
    """Accumulates (path, pid, camid) rows and remembers the (pid, cam) group of each row."""

    def __init__(self):
        self.paths, self.pids, self.camids, self.groups = [], [], [], []

    def add_group(self, pid, cam, folder_paths, names):
        start = len(self.paths)
        self.paths += folder_paths
        self.pids += [pid] * len(names)
        self.camids += [cam] * len(names)
        self.groups.append(GalleryGroup(pid, cam, list(range(start, start + len(names))), list(names)))

    def image_list(self):
        return ImageList(self.paths, self.pids, self.camids)


def check_test_config(cfg):
    """The TEST.* values every builder relies on; ConfigError naming the key otherwise."""
    if cfg.TEST.DIRECTION not in DIRECTIONS:
        raise ConfigError("TEST.DIRECTION must be one of %s, got %r" % (", ".join(DIRECTIONS), cfg.TEST.DIRECTION))
    if cfg.TEST.GALLERY not in GALLERIES:
        raise ConfigError("TEST.GALLERY must be one of %s, got %r" % (", ".join(GALLERIES), cfg.TEST.GALLERY))
    if cfg.TEST.SHOTS < 1:
        raise ConfigError("TEST.SHOTS must be >= 1, got %d" % cfg.TEST.SHOTS)
    if cfg.TEST.NUM_TRIALS < 1:
        raise ConfigError("TEST.NUM_TRIALS must be >= 1, got %d" % cfg.TEST.NUM_TRIALS)
    if cfg.TEST.MODE not in ("all", "indoor"):
        raise ConfigError("TEST.MODE must be 'all' or 'indoor', got %r" % cfg.TEST.MODE)
    seeds = list(cfg.TEST.TRIAL_SEEDS)
    if seeds and cfg.TEST.GALLERY == "official":
        raise ConfigError("TEST.TRIAL_SEEDS %s applies to the seeded galleries; TEST.GALLERY official takes the rows "
                          "0..TEST.NUM_TRIALS-1 of its permutation file (set TEST.TRIAL_SEEDS [])" % seeds)
    if seeds and len(seeds) != cfg.TEST.NUM_TRIALS:
        raise ConfigError("TEST.TRIAL_SEEDS lists %d seeds but TEST.NUM_TRIALS is %d; set both (or TEST.TRIAL_SEEDS [] "
                          "for the seeds 0..NUM_TRIALS-1)" % (len(seeds), cfg.TEST.NUM_TRIALS))


def trial_ids(cfg, trial):
    """Trial numbers (= Python random seeds / rows of the .mat file): `trial`, else
    TEST.TRIAL_SEEDS, else 0..TEST.NUM_TRIALS-1."""
    if trial is not None:
        return [int(trial)]
    if len(cfg.TEST.TRIAL_SEEDS):
        return [int(s) for s in cfg.TEST.TRIAL_SEEDS]
    return list(range(cfg.TEST.NUM_TRIALS))


def seeded_trials(groups, trials, shots):
    """Per trial, the released seeded sampling over `groups` (a list of GalleryGroup)."""
    out = []
    for t in trials:
        r = random.Random(t)  # identical stream to random.seed(t) on the module-level RNG
        chosen = []
        for g in groups:
            if not g.indices:
                continue
            if shots == 1:
                chosen.append(r.choice(g.indices))
            else:
                chosen += r.sample(g.indices, min(shots, len(g.indices)))
        out.append(np.asarray(chosen, dtype=np.int64))
    return out


def seeded_cam_major_trials(groups, trials, shots, cams):
    """Per trial, the seeded sampling over `groups` walked camera-major: cameras in the order
    of `cams`, inside a camera the ids ascending."""
    position = {cam: i for i, cam in enumerate(cams)}
    ordered = sorted((g for g in groups if g.cam in position), key=lambda g: (position[g.cam], g.pid))
    return seeded_trials(ordered, trials, shots)


def _permutation_cells(mat_path):
    from scipy.io import loadmat

    try:
        cells = loadmat(mat_path)["rand_perm_cam"]
    except FileNotFoundError:
        raise DatasetError("official gallery needs %s (not found); use TEST.GALLERY seeded" % mat_path) from None
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DatasetError("cannot read %s as the SYSU permutation file (rand_perm_cam): %s" % (mat_path, exc)) from None
    return cells


def official_trials(groups, trials, shots, mat_path):
    """Per trial, the gallery named by the official SYSU permutation file.

    ``loadmat(mat_path)["rand_perm_cam"][cam - 1][0]`` is camera `cam`'s cell of per-identity
    matrices, indexed by person id - 1; it may be 1 x N or N x 1 (both are read). Row `trial`
    of an identity's matrix lists its 1-based image numbers in that camera; the first `shots`
    name the files ``%04d.jpg``. The numbers may be stored as any integer type (the official
    file and data/synthetic.py use uint8) or as integral floats; a non-integral number is a
    DatasetError.
    """
    cells = _permutation_cells(mat_path)
    per_cam = {}
    out = []
    for t in trials:
        chosen = []
        for g in groups:
            if not g.indices:
                continue
            if g.cam not in per_cam:
                try:
                    per_cam[g.cam] = np.asarray(cells[g.cam - 1][0], dtype=object).reshape(-1)
                except IndexError:
                    raise DatasetError("%s: no entry for camera %d" % (mat_path, g.cam)) from None
            table = per_cam[g.cam]
            if g.pid > len(table):
                raise DatasetError("%s: camera %d has %d identities, id %d is missing" % (mat_path, g.cam, len(table), g.pid))
            perm = np.atleast_2d(np.asarray(table[g.pid - 1]))
            if perm.size == 0:
                continue
            if t >= perm.shape[0]:
                raise DatasetError("%s: camera %d, id %d has %d trial rows, trial %d requested"
                                   % (mat_path, g.cam, g.pid, perm.shape[0], t))
            position = {name: idx for name, idx in zip(g.names, g.indices)}
            for number in perm[t][:shots]:
                if number != int(number):
                    raise DatasetError("%s: camera %d, id %d, trial %d holds image number %r, not an integer"
                                       % (mat_path, g.cam, g.pid, t, number))
                name = "%04d.jpg" % int(number)
                if name not in position:
                    raise DatasetError("%s names cam%d/%04d/%s for trial %d, but that file is not in the dataset"
                                       % (mat_path, g.cam, g.pid, name, t))
                chosen.append(position[name])
        out.append(np.asarray(chosen, dtype=np.int64))
    return out


def build_test_split(cfg, trial=None):
    """The test split of cfg.DATASET.NAME (see the module docstring and :class:`TestSplit`).

    SYSU/LLCM: `trial` = one gallery trial (its seed), None = the trials of TEST.TRIAL_SEEDS
    (empty: 0..TEST.NUM_TRIALS-1).
    RegDB: `trial` = the list files' trial 1..10 (default DATASET.TRIAL), one trial.
    """
    from data.registry import get_dataset

    check_test_config(cfg)
    return get_dataset(cfg).test_split(cfg, trial)


def build_val_split(cfg):
    """Held-out training identities (the last DATASET.VAL_IDS labels): infrared query ->
    visible gallery, protocol "regdb" (no camera removal), one trial over the whole gallery."""
    from data.registry import get_dataset

    held = int(cfg.DATASET.VAL_IDS)
    if held <= 0:
        raise ConfigError("build_val_split needs DATASET.VAL_IDS > 0 (held-out training identities), got %d" % held)
    ds = get_dataset(cfg)
    rgb, ir = ds.train_listing()
    num_classes = int(max(rgb.pids.max(), ir.pids.max())) + 1
    if held >= num_classes:
        raise ConfigError("DATASET.VAL_IDS = %d but the training set has only %d identities" % (held, num_classes))
    first = num_classes - held

    def subset(lst):
        keep = np.flatnonzero(lst.pids >= first)
        return ImageList([lst.paths[i] for i in keep], lst.pids[keep], lst.camids[keep])

    query, gallery = subset(ir), subset(rgb)
    return TestSplit(
        query=query,
        gallery=gallery,
        trials=[np.arange(len(gallery), dtype=np.int64)],
        protocol="regdb",
        query_modality="infrared",
        gallery_modality="visible",
        info={"dataset": cfg.DATASET.NAME, "split": "val", "direction": "ir2vis", "held_out_labels": [first, num_classes - 1],
              "num_query": len(query), "num_gallery": len(gallery)},
    )
