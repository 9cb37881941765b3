"""Synthetic single-modality datasets in the exact on-disk layouts of Market-1501,
DukeMTMC-reID and MSMT17.

The people, cameras and images are those of ``data/synthetic.py`` (per identity a fixed
body, garment layout and colours; per camera its own background, scale and lighting; per
image its own pose, exposure and occluders), all visible. Every image has its own RNG, so
the same arguments always write the same files.

* :func:`write_market`: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with
  ``<pid>_c<cam>s<seq>_<frame>_<box>.jpg`` names, 6 cameras at 64x128, pids scattered over
  1..1501; the test gallery also holds distractors (``0000_...``, people of no other split)
  and junk (``-1_...``, crops of a person's surroundings), as the real gallery does.
* :func:`write_duke`: the same folders with ``<pid>_c<cam>_f<frame>.jpg`` names, 8 cameras
  of different native sizes, pids scattered over 1..7140 (so the released set-order
  relabelling is not ascending); the gallery also holds distractor identities, ordinary
  pids seen by one camera and nowhere else.
* :func:`write_msmt17`: ``train/<pid>/`` and ``test/<pid>/`` (or the V2 names
  ``mask_train_v2/``, ``mask_test_v2/``) with ``<pid>_<index>_<cam>_<date><time>_<frame>_0.jpg``
  names, 15 cameras, and ``list_{train,val,query,gallery}.txt`` of ``<path> <pid>`` lines;
  training pids 0..C-1, test pids 0..T-1 (a separate numbering, as released), about an
  eighth of the training images listed in list_val.txt.

Every identity is seen by 2-4 cameras; a test identity has one query image per camera
it is seen by and its other images in the gallery, so every query has a match in another
camera. Each writer returns its plan: ``train``, ``test`` (pid lists) and ``counts``
{(split, pid, camera): images} (split ``train`` or ``test``), plus the layout's extra entries.
"""
import os

import numpy as np
from PIL import Image

from data.synthetic import (_IMG_STREAM, _SPLIT_STREAM, _rng, _write_images, _write_manifest, _write_text,
                            make_camera, make_identity, render)

MARKET_CAMS = 6
MARKET_SIZE = (64, 128)
MARKET_MAX_PID = 1501
DUKE_CAMS = 8
# Native (W, H) per DukeMTMC camera: the real boxes are larger than Market's and vary.
DUKE_CAM_SIZES = {1: (64, 160), 2: (72, 176), 3: (60, 144), 4: (80, 192), 5: (68, 168), 6: (56, 136),
                  7: (76, 184), 8: (64, 152)}
DUKE_MAX_PID = 7140
MSMT_CAMS = 15
MSMT_CAM_SIZES = {c: (56 + 4 * (c % 5), 128 + 12 * (c % 4)) for c in range(1, MSMT_CAMS + 1)}
MSMT_FOLDERS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}
_MSMT_DAYS = ("0113", "0302", "0303", "0304")
_MSMT_TIMES = ("morning", "noon", "afternoon")

# Sub-streams of data/synthetic.py's split stream used here (that module uses 1..8).
_PLAN, _NAMES, _EXTRAS = 20, 21, 22
# Camera keys: each layout has cameras of its own.
_CAM_BASE = {"market": 100, "duke": 200, "msmt17": 300}
# Identity keys of people outside the numbered identities.
_DISTRACTOR_KEY, _JUNK_KEY, _MSMT_TEST_KEY = 200000, 300000, 100000


def plan_identities(layout, num_train, num_test, seed, images_per_cam, num_cams, max_pid=None):
    """Identity plan: ``train`` / ``test`` pid lists and ``counts`` {(split, pid, cam): images}.

    With `max_pid` the pids are drawn from 1..max_pid (Market, Duke); without, training and
    test pids are each numbered from 0 (MSMT17). Every identity gets 2..min(4, num_cams)
    cameras and images_per_cam - 1 .. + 1 images (at least 2) per camera.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError("need at least one training and one test identity, got %d and %d" % (num_train, num_test))
    stream = sorted(_CAM_BASE).index(layout)
    rng = _rng(seed, _SPLIT_STREAM, _PLAN, stream)
    if max_pid is None:
        train, test = list(range(num_train)), list(range(num_test))
    else:
        if num_train + num_test > max_pid:
            raise ValueError("%d identities do not fit in pids 1..%d" % (num_train + num_test, max_pid))
        ids = rng.choice(np.arange(1, max_pid + 1), num_train + num_test, replace=False)
        train = sorted(int(x) for x in ids[:num_train])
        test = sorted(int(x) for x in ids[num_train:])
    counts = {}
    for split, pids in (("train", train), ("test", test)):
        for pid in pids:
            r = _rng(seed, _SPLIT_STREAM, _PLAN, stream, split == "test", pid)
            cams = r.choice(np.arange(1, num_cams + 1), int(r.integers(2, min(4, num_cams) + 1)), replace=False)
            for cam in sorted(int(c) for c in cams):
                counts[(split, pid, cam)] = int(max(2, images_per_cam + r.integers(-1, 2)))
    return {"train": train, "test": test, "counts": counts}


def _task(root, rel, seed, ident_key, layout, cam, size, index):
    return (os.path.join(root, rel), seed, ident_key, _CAM_BASE[layout] + cam, False, size, index)


def _frames(seed, layout, pid, cam, n, spacing):
    """n increasing frame numbers of one (identity, camera) track."""
    r = _rng(seed, _SPLIT_STREAM, _NAMES, _CAM_BASE[layout], pid, cam)
    start = int(r.integers(1000, 900000))
    return [start + spacing * k + int(r.integers(0, spacing // 2)) for k in range(n)]


def _write_junk(tasks):
    """Junk boxes: a crop of a rendered scene, mostly background, resized back to the box size."""
    for path, seed, key, cam_key, _, size, index in tasks:
        img = render(make_identity(seed, key), make_camera(seed, cam_key, False, size),
                     _rng(seed, _IMG_STREAM, key, cam_key, 0, index))
        r = _rng(seed, _SPLIT_STREAM, _EXTRAS, key)
        w, h = size
        cw, ch = int(w * r.uniform(0.4, 0.7)), int(h * r.uniform(0.3, 0.5))
        x0, y0 = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR).save(path, quality=92)


def write_market(root, num_train=10, num_test=10, seed=0, images_per_cam=3, num_distractors=6, num_junk=4,
                 workers=1):
    """Write a Market-1501-layout dataset under `root`; returns the plan (module docstring)
    plus ``distractors`` / ``junk`` (file names in bounding_box_test/)."""
    plan = plan_identities("market", num_train, num_test, seed, images_per_cam, MARKET_CAMS, MARKET_MAX_PID)
    tasks = []
    for (split, pid, cam), n in sorted(plan["counts"].items()):
        seq = 1 + (pid + cam) % 6
        frames = _frames(seed, "market", pid, cam, n + 1, 50)
        folder = "bounding_box_train" if split == "train" else "bounding_box_test"
        for k in range(1, n + 1):
            name = "%04d_c%ds%d_%06d_%02d.jpg" % (pid, cam, seq, frames[k], 1 + k % 3)
            tasks.append(_task(root, os.path.join(folder, name), seed, pid, "market", cam, MARKET_SIZE, k))
        if split == "test":
            # Query boxes were drawn by hand in the real data: box number 00.
            name = "%04d_c%ds%d_%06d_00.jpg" % (pid, cam, seq, frames[0])
            tasks.append(_task(root, os.path.join("query", name), seed, pid, "market", cam, MARKET_SIZE, 0))
    extras = {"distractors": [], "junk": []}
    junk_tasks = []
    for kind, count, key, label in (("distractors", num_distractors, _DISTRACTOR_KEY, "0000"),
                                    ("junk", num_junk, _JUNK_KEY, "-1")):
        for j in range(count):
            r = _rng(seed, _SPLIT_STREAM, _EXTRAS, key, j)
            cam = int(r.integers(1, MARKET_CAMS + 1))
            seq = int(r.integers(1, 7))
            frame = 1000 * (j + 1) + int(r.integers(0, 999))  # distinct per j: unique names
            name = "%s_c%ds%d_%06d_%02d.jpg" % (label, cam, seq, frame, int(r.integers(1, 9)))
            extras[kind].append(name)
            task = _task(root, os.path.join("bounding_box_test", name), seed, key + j, "market", cam, MARKET_SIZE, 0)
            (junk_tasks if kind == "junk" else tasks).append(task)
    _write_images(tasks, workers)
    _write_junk(junk_tasks)
    _write_manifest(root, {"layout": "market", "seed": seed, "train": num_train, "test": num_test,
                           "images_per_cam": images_per_cam, "distractors": num_distractors, "junk": num_junk,
                           "images": len(tasks) + len(junk_tasks)})
    return dict(plan, **extras)


def write_duke(root, num_train=10, num_test=10, seed=0, images_per_cam=3, num_distractor_ids=3, workers=1):
    """Write a DukeMTMC-reID-layout dataset under `root`; returns the plan (module docstring)
    plus ``distractor_ids`` {pid: camera} (gallery-only identities)."""
    plan = plan_identities("duke", num_train, num_test, seed, images_per_cam, DUKE_CAMS, DUKE_MAX_PID)
    used = set(plan["train"]) | set(plan["test"])
    r = _rng(seed, _SPLIT_STREAM, _EXTRAS, _CAM_BASE["duke"])
    free = np.array(sorted(set(range(1, DUKE_MAX_PID + 1)) - used))
    distractors = {int(p): int(r.integers(1, DUKE_CAMS + 1))
                   for p in sorted(r.choice(free, num_distractor_ids, replace=False))}
    counts = dict(plan["counts"])
    counts.update({("distractor", pid, cam): max(2, images_per_cam) for pid, cam in distractors.items()})
    tasks = []
    for (split, pid, cam), n in sorted(counts.items()):
        frames = _frames(seed, "duke", pid, cam, n + 1, 120)
        size = DUKE_CAM_SIZES[cam]
        folder = "bounding_box_train" if split == "train" else "bounding_box_test"
        for k in range(1, n + 1):
            tasks.append(_task(root, os.path.join(folder, "%04d_c%d_f%07d.jpg" % (pid, cam, frames[k])),
                               seed, pid, "duke", cam, size, k))
        if split == "test":
            tasks.append(_task(root, os.path.join("query", "%04d_c%d_f%07d.jpg" % (pid, cam, frames[0])),
                               seed, pid, "duke", cam, size, 0))
    _write_images(tasks, workers)
    _write_manifest(root, {"layout": "duke", "seed": seed, "train": num_train, "test": num_test,
                           "images_per_cam": images_per_cam, "distractor_ids": num_distractor_ids,
                           "images": len(tasks)})
    return dict(plan, distractor_ids=distractors)


def write_msmt17(root, num_train=10, num_test=10, seed=0, images_per_cam=3, version="v1", workers=1):
    """Write an MSMT17-layout dataset under `root` (`version` ``v1``: train/ and test/,
    ``v2``: mask_train_v2/ and mask_test_v2/); returns the plan (module docstring) plus
    ``lists`` {list file name: [(relative path, pid)]}."""
    if version not in MSMT_FOLDERS:
        raise ValueError("version must be one of %s, got %r" % (", ".join(MSMT_FOLDERS), version))
    plan = plan_identities("msmt17", num_train, num_test, seed, images_per_cam, MSMT_CAMS)
    train_dir, test_dir = MSMT_FOLDERS[version]
    lists = {name: [] for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")}
    tasks, index = [], {}
    for (split, pid, cam), n in sorted(plan["counts"].items()):
        r = _rng(seed, _SPLIT_STREAM, _NAMES, _CAM_BASE["msmt17"], split == "test", pid, cam)
        when = _MSMT_DAYS[int(r.integers(len(_MSMT_DAYS)))] + _MSMT_TIMES[int(r.integers(len(_MSMT_TIMES)))]
        frame = int(r.integers(1, 3000))
        key = pid + (_MSMT_TEST_KEY if split == "test" else 0)
        for k in range(n):
            i = index[(split, pid)] = index.get((split, pid), -1) + 1
            rel = "%04d/%04d_%03d_%02d_%s_%04d_0.jpg" % (pid, pid, i, cam, when, frame + 5 * k)
            if split == "train":
                listed = "list_val.txt" if r.uniform() < 0.125 else "list_train.txt"
            else:
                listed = "list_query.txt" if k == 0 else "list_gallery.txt"
            lists[listed].append((rel, pid))
            folder = train_dir if split == "train" else test_dir
            tasks.append(_task(root, os.path.join(folder, rel), seed, key, "msmt17", cam, MSMT_CAM_SIZES[cam], k))
    # The real lists are never empty; neither are these.
    if not lists["list_val.txt"]:
        lists["list_val.txt"].append(lists["list_train.txt"].pop())
    if not lists["list_train.txt"]:
        lists["list_train.txt"].append(lists["list_val.txt"].pop(0))
    _write_images(tasks, workers)
    for name, rows in lists.items():
        _write_text(os.path.join(root, name), "".join("%s %d\n" % row for row in rows))
    _write_manifest(root, {"layout": "msmt17", "seed": seed, "train": num_train, "test": num_test,
                           "images_per_cam": images_per_cam, "version": version, "images": len(tasks)})
    return dict(plan, lists=lists)
