"""SYSU-MM01: folder layout, training-array preprocessing, training arrays and test sets.

Layout: ``cam1..cam6/<4-digit id>/<4-digit n>.jpg``,
RGB cameras 1, 2, 4, 5 and IR cameras 3, 6, plus ``exp/{train,val,test}_id.txt`` (first line,
comma-separated ids) and optionally ``exp/rand_perm_cam.mat`` (the official gallery permutations).

Preprocessing (released ``pre_process_sysu.py`` semantics): train + val ids, walked in
ascending order; per id the RGB cameras 1, 2, 4, 5 (IR: 3, 6) whose folder exists, files
sorted; labels = position of the id in ascending order (what the released set-based relabel
yields); every image resized to (W, H) without keeping the aspect ratio, with LANCZOS as
released (or INPUT.RESIZE_FILTER: one set of arrays per filter, :func:`array_files`). Output:
``train_{rgb,ir}_resized_{img,label}.npy`` ([N, H, W, 3] uint8 and [N] int64) in the root,
plus ``train_resized_info.json`` (size and a fingerprint of the file list) that makes a rerun
with up-to-date arrays a no-op.

Test sets: query = every IR image (cam3 then cam6) of the test ids, in both
search modes; gallery candidates = every RGB image of the mode's cameras (all: 1, 2, 4, 5;
indoor: 1, 2) of the test ids; trials pick from them per (id, camera) (``data/testsets.py``).
Cameras and ids come from the folder walk, never from parsing the root path.
"""
import hashlib
import json
import os
import time

import numpy as np

from data.errors import DatasetError
from data.image_io import decode_resized, list_image_files
from data.labels import validate_train_labels
from data.listfiles import read_id_file, require_root
from data.datasets.base import ReIDDataset
from data.items import from_modality_arrays
from data.registry import DATASETS
from data.testsets import (ImageList, ListBuilder, TestSplit, official_trials, seeded_cam_major_trials, seeded_trials,
                           trial_ids)
from utils.config import ConfigError
from utils.io import atomic_path, save_json, save_npy

RGB_CAMS = (1, 2, 4, 5)
IR_CAMS = (3, 6)
INDOOR_CAMS = (1, 2)
ARRAYS = {
    "rgb_img": "train_rgb_resized_img.npy",
    "rgb_label": "train_rgb_resized_label.npy",
    "ir_img": "train_ir_resized_img.npy",
    "ir_label": "train_ir_resized_label.npy",
}
INFO_FILE = "train_resized_info.json"


def array_files(resample="lanczos"):
    """(array file names, info file name) of the training arrays resized with `resample`:
    the released names for LANCZOS, ``..._resized_<filter>_...`` for another filter."""
    if resample == "lanczos":
        return ARRAYS, INFO_FILE
    return ({k: v.replace("_resized_", "_resized_%s_" % resample) for k, v in ARRAYS.items()},
            INFO_FILE.replace("_resized_", "_resized_%s_" % resample))

DEFAULT_SIZE = (192, 384)  # (W, H) of the CMFN recipe
LAYOUT = "cam1..cam6/<4-digit id>/<4-digit n>.jpg and exp/{train,val,test}_id.txt"
_INFO_VERSION = 1


def _id_folder(root, cam, pid):
    return os.path.join(root, "cam%d" % cam, "%04d" % pid)


def _walk(root, ids, cams, what):
    """[(pid, cam, names)] for every id (sorted) and camera folder that exists.

    Ids without any folder in any of the layout's six cameras raise one DatasetError.
    """
    rows, absent = [], []
    for pid in sorted(set(ids)):
        found = False
        for cam in RGB_CAMS + IR_CAMS:
            if os.path.isdir(_id_folder(root, cam, pid)):
                found = True
                if cam in cams:
                    rows.append((pid, cam, list_image_files(_id_folder(root, cam, pid))))
        if not found:
            absent.append(pid)
    if absent:
        shown = ", ".join("%04d" % p for p in absent[:10]) + (" ... (%d in all)" % len(absent) if len(absent) > 10 else "")
        raise DatasetError("%s names ids with no folder in any camera (expected e.g. %s): %s"
                           % (what, _id_folder(root, 1, absent[0]), shown))
    return rows


def training_listing(root):
    """Released training order: dict with ``ids`` and per modality ``rgb``/``ir`` =
    (relative paths, labels, cameras), ids in ascending order mapped to labels 0..C-1."""
    require_root(root, "SYSU-MM01", LAYOUT)
    exp = os.path.join(root, "exp")
    ids = sorted(set(read_id_file(os.path.join(exp, "train_id.txt")) + read_id_file(os.path.join(exp, "val_id.txt"))))
    what = "%s + val_id.txt" % os.path.join(exp, "train_id.txt")
    rows = _walk(root, ids, RGB_CAMS + IR_CAMS, what)
    per_mod = {"rgb": ([], [], []), "ir": ([], [], [])}
    seen = {"rgb": set(), "ir": set()}
    label = {pid: i for i, pid in enumerate(ids)}
    for pid, cam, names in rows:
        mod = "rgb" if cam in RGB_CAMS else "ir"
        rels, labels, cams = per_mod[mod]
        for name in names:
            rels.append(os.path.join("cam%d" % cam, "%04d" % pid, name))
            labels.append(label[pid])
            cams.append(cam)
        if names:
            seen[mod].add(pid)
    missing = {mod: [p for p in ids if p not in seen[mod]] for mod in seen}
    if missing["rgb"] or missing["ir"]:
        parts = []
        for mod, cams in (("rgb", RGB_CAMS), ("ir", IR_CAMS)):
            if missing[mod]:
                parts.append("no %s images (cams %s) for ids %s" % (
                    "RGB" if mod == "rgb" else "IR", ",".join(map(str, cams)), ", ".join("%04d" % p for p in missing[mod][:10])))
        raise DatasetError("%s: every training identity needs RGB and IR images; %s" % (root, "; ".join(parts)))
    return {"ids": ids, "rgb": per_mod["rgb"], "ir": per_mod["ir"]}


def _fingerprint(root, listing, size, resample):
    h = hashlib.sha256()
    meta = {"size": list(size), "ids": listing["ids"]}
    if resample != "lanczos":
        meta["resample"] = resample
    h.update(json.dumps(meta).encode())
    for mod in ("rgb", "ir"):
        for rel in listing[mod][0]:
            st = os.stat(os.path.join(root, rel))
            h.update(("%s\t%d\t%d\n" % (rel, st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()


def _arrays_match(root, size, listing, files):
    """True when the four arrays exist with the shapes the listing and size imply."""
    width, height = size
    try:
        for mod in ("rgb", "ir"):
            n = len(listing[mod][0])
            img = np.load(os.path.join(root, files[mod + "_img"]), mmap_mode="r")
            lab = np.load(os.path.join(root, files[mod + "_label"]), mmap_mode="r")
            if img.shape != (n, height, width, 3) or lab.shape != (n,):
                return False
    except (OSError, ValueError):
        return False
    return True


def preprocess_sysu(root, size=DEFAULT_SIZE, workers=None, progress=True, force=False, resample="lanczos"):
    """Write the four training arrays of `root` at `size` = (W, H) resized with `resample`
    (:func:`array_files` names them); skip when up to date.

    Returns a summary dict (``skipped``, counts, ``seconds``). Decoding is parallel
    (``data/image_io.py``) into a memory-mapped temporary .npy that is renamed when complete.
    """
    start = time.time()
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise ValueError("size must be positive (W, H), got %s" % (size,))
    listing = training_listing(root)
    files, info_file = array_files(resample)
    fingerprint = _fingerprint(root, listing, size, resample)
    info_path = os.path.join(root, info_file)
    summary = {"root": root, "size": list(size), "num_ids": len(listing["ids"]),
               "num_rgb": len(listing["rgb"][0]), "num_ir": len(listing["ir"][0])}
    if not force and os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = {}
        if info.get("fingerprint") == fingerprint and _arrays_match(root, size, listing, files):
            return dict(summary, skipped=True, seconds=time.time() - start)
    try:
        # The arrays are about to change: a stale record must never vouch for them.
        os.remove(info_path)
    except FileNotFoundError:
        pass
    width, height = size
    for mod in ("rgb", "ir"):
        rels, labels, _ = listing[mod]
        paths = [os.path.join(root, r) for r in rels]
        with atomic_path(os.path.join(root, files[mod + "_img"])) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), height, width, 3))
            try:
                decode_resized(paths, size, out=arr, workers=workers, resample=resample,
                               progress=("SYSU %s %dx%d" % (mod.upper(), width, height)) if progress else None)
                arr.flush()
            finally:
                del arr
        save_npy(os.path.join(root, files[mod + "_label"]), np.asarray(labels, dtype=np.int64))
    save_json(info_path, {"version": _INFO_VERSION, "size": list(size), "fingerprint": fingerprint,
                          "num_ids": summary["num_ids"], "num_rgb": summary["num_rgb"], "num_ir": summary["num_ir"]})
    return dict(summary, skipped=False, seconds=time.time() - start)


def load_training_arrays(root, size, resample="lanczos"):
    """The four arrays, memory-mapped, checked against `size` = (W, H) and the label rules."""
    require_root(root, "SYSU-MM01", LAYOUT)
    paths = {k: os.path.join(root, v) for k, v in array_files(resample)[0].items()}
    width, height = size
    redo = "run: python pre_process_sysu.py --root %s --size %d %d%s" % (
        root, width, height, "" if resample == "lanczos" else " --filter %s" % resample)
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise DatasetError("SYSU-MM01 training arrays missing: %s; %s" % (", ".join(missing), redo))
    try:
        arrays = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
    except (OSError, ValueError) as exc:
        raise DatasetError("cannot read the SYSU-MM01 training arrays in %s (%s); %s" % (root, exc, redo)) from None
    for mod in ("rgb", "ir"):
        img, lab = arrays[mod + "_img"], arrays[mod + "_label"]
        if img.ndim != 4 or img.shape[1:] != (height, width, 3) or img.dtype != np.uint8:
            raise DatasetError("%s has shape %s %s, expected [N, %d, %d, 3] uint8 for INPUT.SIZE_TRAIN [%d, %d]; %s"
                               % (paths[mod + "_img"], img.shape, img.dtype, height, width, height, width, redo))
        if lab.shape != (img.shape[0],):
            raise DatasetError("%s has %s labels for %d images; %s" % (paths[mod + "_label"], lab.shape, img.shape[0], redo))
    rgb_lab, ir_lab = validate_train_labels(np.asarray(arrays["rgb_label"]), np.asarray(arrays["ir_label"]),
                                            paths["rgb_label"], paths["ir_label"])
    return arrays["rgb_img"], rgb_lab, arrays["ir_img"], ir_lab


def sysu_test_split(root, cfg, trial, dataset="sysu"):
    """Query (all IR images of the test ids) and gallery candidates + trials (module doc)."""
    require_root(root, "SYSU-MM01", LAYOUT)
    if cfg.TEST.DIRECTION != "ir2vis":
        raise ConfigError("SYSU-MM01 defines only TEST.DIRECTION ir2vis (IR query, RGB gallery), got %r"
                          % cfg.TEST.DIRECTION)
    id_path = os.path.join(root, "exp", "test_id.txt")
    ids = read_id_file(id_path)
    gallery_cams = INDOOR_CAMS if cfg.TEST.MODE == "indoor" else RGB_CAMS
    query, gallery = ListBuilder(), ListBuilder()
    # Camera order inside each id follows the listed tuples (cam3 before cam6, 1, 2, 4, 5).
    for pid, cam, names in _walk(root, ids, IR_CAMS + gallery_cams, id_path):
        target = query if cam in IR_CAMS else gallery
        target.add_group(pid, cam, [os.path.join(_id_folder(root, cam, pid), n) for n in names], names)
    if not query.paths:
        raise DatasetError("%s: no IR query images (cam3/cam6) for the ids in %s" % (root, id_path))
    if not gallery.paths:
        raise DatasetError("%s: no RGB gallery images (cams %s) for the ids in %s"
                           % (root, ",".join(map(str, gallery_cams)), id_path))
    trials = trial_ids(cfg, trial)
    shots = int(cfg.TEST.SHOTS)
    if cfg.TEST.GALLERY == "official":
        chosen = official_trials(gallery.groups, trials, shots, os.path.join(root, "exp", "rand_perm_cam.mat"))
    elif cfg.TEST.GALLERY == "seeded_cam_major":
        chosen = seeded_cam_major_trials(gallery.groups, trials, shots, gallery_cams)
    else:
        chosen = seeded_trials(gallery.groups, trials, shots)
    q, g = query.image_list(), gallery.image_list()
    return TestSplit(
        query=q,
        gallery=g,
        trials=chosen,
        protocol="sysu",
        query_modality="infrared",
        gallery_modality="visible",
        info={"dataset": dataset, "root": root, "mode": cfg.TEST.MODE, "direction": "ir2vis",
              "gallery": cfg.TEST.GALLERY, "shots": shots, "trials": trials, "num_query": len(q),
              "num_gallery_candidates": len(g), "gallery_sizes": [int(len(t)) for t in chosen],
              "num_ids": len(set(ids))},
    )


@DATASETS.register("sysu")
class SYSUMM01(ReIDDataset):
    """SYSU-MM01: 395 training identities (22,258 RGB + 11,909 IR images), 96 test identities
    (3,803 IR queries). Training images come from the preprocessed arrays, test sets from the
    folders."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.DATASET.NAME

    def train_images(self, size):
        return load_training_arrays(self.root, size, self.resample)

    def train_items(self, size):
        rgb, rgb_lab, ir, ir_lab = self.train_images(size)
        rgb_list, ir_list = self.train_listing()
        return from_modality_arrays(rgb, rgb_lab, rgb_list.camids, ir, ir_lab, ir_list.camids,
                                    "SYSU-MM01 training arrays in %s" % self.root)

    @classmethod
    def result_tags(cls, cfg):
        return [cfg.TEST.MODE] + super().result_tags(cfg)

    def train_listing(self):
        listing = training_listing(self.root)
        out = []
        for mod in ("rgb", "ir"):
            rels, labels, cams = listing[mod]
            out.append(ImageList([os.path.join(self.root, r) for r in rels], labels, cams))
        return tuple(out)

    def test_split(self, cfg, trial=None):
        return sysu_test_split(self.root, cfg, trial, self.name)
