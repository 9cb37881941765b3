"""Test splits: the released gallery rules (recomputed independently), official .mat, LLCM and
RegDB directions, the validation split, TestImageDataset, and bad input."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat

from data import DatasetError, TestImageDataset, build_test_split, build_val_split
from utils.config import ConfigError, build_config


@pytest.fixture
def keep_random_state():
    state = random.getstate()
    yield
    random.setstate(state)


def _cfg(name, root, *opts):
    return build_config(name, opts=["DATASET.ROOT", root, *opts])


def _test_ids(path):
    with open(path) as f:
        return ["%04d" % int(y) for y in f.read().splitlines()[0].split(",")]


def _released_sysu_gallery(root, mode, trial, shots=1):
    """process_gallery_sysu as released (single-shot), plus the multi-shot rule."""
    random.seed(trial)
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    files = []
    for pid in sorted(_test_ids(os.path.join(root, "exp", "test_id.txt"))):
        for cam in cams:
            d = os.path.join(root, cam, pid)
            if os.path.isdir(d):
                new = sorted([d + "/" + i for i in os.listdir(d)])
                if shots == 1:
                    files.append(random.choice(new))
                else:
                    files += random.sample(new, min(shots, len(new)))
    return files


def _released_sysu_query(root):
    files = []
    for pid in sorted(_test_ids(os.path.join(root, "exp", "test_id.txt"))):
        for cam in ["cam3", "cam6"]:
            d = os.path.join(root, cam, pid)
            if os.path.isdir(d):
                files += sorted([d + "/" + i for i in os.listdir(d)])
    return files


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_seeded_single_shot_is_the_released_rule(synthetic_root, keep_random_state, mode):
    root = synthetic_root("sysu")
    split = build_test_split(_cfg("sysu", root, "TEST.MODE", mode, "TEST.NUM_TRIALS", "4"))
    assert split.protocol == "sysu" and split.query_modality == "infrared" and split.gallery_modality == "visible"
    assert split.info["trials"] == [0, 1, 2, 3] and split.info["gallery"] == "seeded"
    assert split.query.paths == _released_sysu_query(root)
    # The released fixed-offset parsing of camera and id.
    assert split.query.camids.tolist() == [int(p[-15]) for p in split.query.paths]
    assert split.query.pids.tolist() == [int(p[-13:-9]) for p in split.query.paths]
    galleries = []
    for t, idx in enumerate(split.trials):
        assert idx.dtype == np.int64
        chosen = [split.gallery.paths[i] for i in idx]
        assert chosen == _released_sysu_gallery(root, mode, t)
        assert split.gallery.camids[idx].tolist() == [int(p[-15]) for p in chosen]
        assert split.gallery.pids[idx].tolist() == [int(p[-13:-9]) for p in chosen]
        galleries.append(chosen)
    assert galleries[0] != galleries[1]
    cams = set(split.gallery.camids.tolist())
    assert cams == ({1, 2, 4, 5} if mode == "all" else {1, 2}) or cams < {1, 2, 4, 5}
    # Candidates are listed once and cover every image of the mode's cameras.
    assert len(set(split.gallery.paths)) == len(split.gallery.paths)
    one = build_test_split(_cfg("sysu", root, "TEST.MODE", mode), trial=2)
    assert len(one.trials) == 1 and [one.gallery.paths[i] for i in one.trials[0]] == galleries[2]


@pytest.mark.parametrize("shots", [2, 10])
def test_sysu_seeded_multi_shot(synthetic_root, keep_random_state, shots):
    root = synthetic_root("sysu")
    split = build_test_split(_cfg("sysu", root, "TEST.SHOTS", str(shots), "TEST.NUM_TRIALS", "2"))
    for t, idx in enumerate(split.trials):
        assert [split.gallery.paths[i] for i in idx] == _released_sysu_gallery(root, "all", t, shots)
    if shots == 10:  # fewer than 10 images per (id, camera): all of them, in sampled order
        assert sorted(split.trials[0].tolist()) == list(range(len(split.gallery)))


@pytest.mark.parametrize("shots", [1, 2])
def test_sysu_official_gallery_follows_the_mat_file(synthetic_root, shots):
    root = synthetic_root("sysu")
    cells = loadmat(os.path.join(root, "exp", "rand_perm_cam.mat"))["rand_perm_cam"]
    split = build_test_split(_cfg("sysu", root, "TEST.GALLERY", "official", "TEST.SHOTS", str(shots),
                                  "TEST.NUM_TRIALS", "3"))
    assert split.info["gallery"] == "official"
    for t, idx in enumerate(split.trials):
        expected = []
        for pid in sorted(int(x) for x in _test_ids(os.path.join(root, "exp", "test_id.txt"))):
            for cam in (1, 2, 4, 5):
                perm = cells[cam - 1][0].squeeze()[pid - 1]
                if perm.size:
                    expected += [os.path.join(root, "cam%d" % cam, "%04d" % pid, "%04d.jpg" % n) for n in perm[t][:shots]]
        assert [split.gallery.paths[i] for i in idx] == expected


def test_sysu_official_errors(synthetic_root, tmp_path):
    root = str(tmp_path / "S")
    shutil.copytree(synthetic_root("sysu"), root)
    cfg = _cfg("sysu", root, "TEST.GALLERY", "official")
    split = build_test_split(cfg)
    first = split.gallery.paths[split.trials[0][0]]
    os.remove(first)
    with pytest.raises(DatasetError, match=r"rand_perm_cam.mat names cam\d/\d{4}/\d{4}.jpg for trial 0"):
        build_test_split(cfg)
    os.remove(os.path.join(root, "exp", "rand_perm_cam.mat"))
    with pytest.raises(DatasetError, match="official gallery needs .*rand_perm_cam.mat"):
        build_test_split(cfg)


def _rewrite_permutations(mat_path, column, dtype):
    """Re-save rand_perm_cam.mat with each camera's cell N x 1 (`column`) or 1 x N and the
    numbers as `dtype`."""
    from scipy.io import savemat

    cells = loadmat(mat_path)["rand_perm_cam"]
    out = np.empty((6, 1), dtype=object)
    for cam in range(6):
        per_id = cells[cam][0].reshape(-1)
        table = np.empty((len(per_id), 1) if column else (1, len(per_id)), dtype=object)
        for i, perm in enumerate(per_id):
            table.flat[i] = perm.astype(dtype)
        out[cam, 0] = table
    savemat(mat_path, {"rand_perm_cam": out})
    return out


def test_sysu_official_reads_both_cell_layouts(synthetic_root, tmp_path):
    # the written file (uint8, 1 x N cells), the same numbers in N x 1 cells, and float64 numbers
    # (what data/synthetic.py wrote before) all give the same galleries
    root = str(tmp_path / "S")
    shutil.copytree(synthetic_root("sysu"), root)
    mat = os.path.join(root, "exp", "rand_perm_cam.mat")
    cfg = _cfg("sysu", root, "TEST.GALLERY", "official", "TEST.SHOTS", "2", "TEST.NUM_TRIALS", "3")
    assert loadmat(mat)["rand_perm_cam"][0][0][0, 0].dtype == np.uint8
    written = [t.tolist() for t in build_test_split(cfg).trials]
    assert sum(len(t) for t in written) > 0
    for column, dtype in ((True, np.uint8), (False, np.float64), (True, np.float64)):
        cells = _rewrite_permutations(mat, column, dtype)
        loaded = loadmat(mat)["rand_perm_cam"]
        assert loaded[0][0].shape == cells[0][0].shape and loaded[0][0].flat[0].dtype == dtype
        assert [t.tolist() for t in build_test_split(cfg).trials] == written
    # a number that names no file: not silently truncated
    cells = loadmat(mat)["rand_perm_cam"]
    table = cells[0][0]
    test_ids = sorted(int(x) for x in _test_ids(os.path.join(root, "exp", "test_id.txt")))
    pid = next(p for p in test_ids if table.flat[p - 1].size)
    table.flat[pid - 1] = table.flat[pid - 1] + 0.5
    from scipy.io import savemat

    savemat(mat, {"rand_perm_cam": cells})
    with pytest.raises(DatasetError, match=r"camera 1, id %d, trial 0 holds image number .*not an integer" % pid):
        build_test_split(_cfg("sysu", root, "TEST.GALLERY", "official", "TEST.SHOTS", "1", "TEST.NUM_TRIALS", "1"))


def test_sysu_bad_input(synthetic_root, tmp_path):
    root = str(tmp_path / "S")
    shutil.copytree(synthetic_root("sysu"), root)
    with pytest.raises(ConfigError, match="ir2vis"):
        build_test_split(_cfg("sysu", root, "TEST.DIRECTION", "vis2ir"))
    with pytest.raises(ConfigError, match="TEST.MODE"):
        build_test_split(_cfg("sysu", root, "TEST.MODE", "outdoor"))
    with open(os.path.join(root, "exp", "test_id.txt"), "w") as f:
        f.write("1,x,3\n")
    with pytest.raises(DatasetError, match="test_id.txt: expected comma-separated integers"):
        build_test_split(_cfg("sysu", root))
    with open(os.path.join(root, "exp", "test_id.txt"), "w") as f:
        f.write("999\n")
    with pytest.raises(DatasetError, match=r"test_id.txt names ids with no folder.*0999"):
        build_test_split(_cfg("sysu", root))
    os.remove(os.path.join(root, "exp", "test_id.txt"))
    with pytest.raises(DatasetError, match="id file not found: .*test_id.txt"):
        build_test_split(_cfg("sysu", root))
    with pytest.raises(DatasetError, match="root not found"):
        build_test_split(_cfg("sysu", root + "_nope"))


# ------------------------------------------------------------------ LLCM


def _released_llcm(root, folder, cams, trial=None):
    """process_query_llcm / process_gallery_llcm walk, with cameras taken from the walk."""
    if trial is not None:
        random.seed(trial)
    files, camids = [], []
    for pid in sorted(_test_ids(os.path.join(root, "idx", "test_id.txt"))):
        for cam in cams:
            d = os.path.join(root, folder, "cam%d" % cam, pid)
            if os.path.isdir(d):
                new = sorted([d + "/" + i for i in os.listdir(d)])
                picked = [random.choice(new)] if trial is not None else new
                files += picked
                camids += [cam] * len(picked)
    return files, camids


@pytest.mark.parametrize("direction", ["ir2vis", "vis2ir"])
def test_llcm_directions_and_root_containing_cam(synthetic_root, keep_random_state, direction):
    root = synthetic_root("llcm")
    assert "cam" in root  # the released parser's int(path.split('cam')[1][0]) breaks here
    split = build_test_split(_cfg("llcm", root, "TEST.DIRECTION", direction, "TEST.NUM_TRIALS", "3"))
    vis_cams, nir_cams = list(range(1, 10)), [1, 2, 4, 5, 6, 7, 8, 9]
    q_folder, q_cams, g_folder, g_cams = ("test_nir", nir_cams, "test_vis", vis_cams) if direction == "ir2vis" \
        else ("test_vis", vis_cams, "test_nir", nir_cams)
    assert split.protocol == "llcm"
    assert split.query_modality == ("infrared" if direction == "ir2vis" else "visible")
    files, camids = _released_llcm(root, q_folder, q_cams)
    assert split.query.paths == files and split.query.camids.tolist() == camids
    for path, cam, pid in zip(split.query.paths, split.query.camids, split.query.pids):
        parts = os.path.relpath(path, root).split(os.sep)
        assert parts[1] == "cam%d" % cam and int(parts[2]) == pid
    for t, idx in enumerate(split.trials):
        files, camids = _released_llcm(root, g_folder, g_cams, trial=t)
        assert [split.gallery.paths[i] for i in idx] == files
        assert split.gallery.camids[idx].tolist() == camids


def test_llcm_bad_input(synthetic_root, tmp_path):
    root = str(tmp_path / "L")
    shutil.copytree(synthetic_root("llcm"), root)
    with pytest.raises(ConfigError, match="only for SYSU"):
        build_test_split(_cfg("llcm", root, "TEST.GALLERY", "official"))
    with open(os.path.join(root, "idx", "test_id.txt"), "w") as f:
        f.write("4242\n")
    with pytest.raises(DatasetError, match="test_id.txt names ids with no images.*4242"):
        build_test_split(_cfg("llcm", root))


# ------------------------------------------------------------------ RegDB


@pytest.mark.parametrize("direction", ["vis2ir", "ir2vis"])
def test_regdb_trial_lists(synthetic_root, direction):
    root = synthetic_root("regdb")
    split = build_test_split(_cfg("regdb", root, "TEST.DIRECTION", direction), trial=7)
    vis = [line.split(" ") for line in open(os.path.join(root, "idx", "test_visible_7.txt")).read().splitlines()]
    the = [line.split(" ") for line in open(os.path.join(root, "idx", "test_thermal_7.txt")).read().splitlines()]
    q, g = (vis, the) if direction == "vis2ir" else (the, vis)
    assert split.query.paths == [os.path.join(root, p) for p, _ in q]
    assert split.gallery.paths == [os.path.join(root, p) for p, _ in g]
    assert split.query.pids.tolist() == [int(lab) for _, lab in q]
    assert split.protocol == "regdb" and split.info["trial"] == 7
    assert len(split.trials) == 1 and split.trials[0].tolist() == list(range(len(g)))
    assert split.query_modality == ("visible" if direction == "vis2ir" else "infrared")
    default = build_test_split(_cfg("regdb", root, "DATASET.TRIAL", "3"))
    assert default.info["trial"] == 3 and default.query.paths[0].startswith(os.path.join(root, "Visible"))


def test_regdb_bad_input(synthetic_root, tmp_path):
    root = str(tmp_path / "R")
    shutil.copytree(synthetic_root("regdb"), root)
    with pytest.raises(ConfigError, match="trial 1..10"):
        build_test_split(_cfg("regdb", root), trial=11)
    os.remove(os.path.join(root, "idx", "test_thermal_2.txt"))
    with pytest.raises(DatasetError, match="list file not found: .*test_thermal_2.txt"):
        build_test_split(_cfg("regdb", root), trial=2)
    first = open(os.path.join(root, "idx", "test_visible_1.txt")).readline().split(" ")[0]
    os.remove(os.path.join(root, first))
    with pytest.raises(DatasetError, match="test_visible_1.txt names 1 image.*do not exist.*" + first):
        build_test_split(_cfg("regdb", root), trial=1)
    with open(os.path.join(root, "idx", "test_visible_5.txt"), "a") as f:
        f.write("Visible/1/x.bmp notanint\n")
    with pytest.raises(DatasetError, match=r"test_visible_5.txt line \d+: expected '<relative path> <int label>'"):
        build_test_split(_cfg("regdb", root), trial=5)


# ------------------------------------------------------------------ validation split, images


def test_val_split_holds_out_the_last_labels(synthetic_root):
    root = synthetic_root("sysu")
    split = build_val_split(_cfg("sysu", root, "DATASET.VAL_IDS", "2"))
    assert split.protocol == "regdb" and split.query_modality == "infrared"
    assert set(split.query.pids.tolist()) == {4, 5} and set(split.gallery.pids.tolist()) == {4, 5}
    assert set(split.query.camids.tolist()) <= {3, 6} and set(split.gallery.camids.tolist()) <= {1, 2, 4, 5}
    assert split.trials[0].tolist() == list(range(len(split.gallery)))
    with pytest.raises(ConfigError, match="VAL_IDS > 0"):
        build_val_split(_cfg("sysu", root))
    llcm = build_val_split(_cfg("llcm", synthetic_root("llcm"), "DATASET.VAL_IDS", "1"))
    assert set(llcm.query.pids.tolist()) == {3} and (llcm.query.camids > 0).all()


def test_test_image_dataset(synthetic_root, tmp_path):
    root = synthetic_root("regdb")
    cfg = _cfg("regdb", root, "INPUT.SIZE_TEST", "[40, 20]")
    split = build_test_split(cfg)
    ds = TestImageDataset(split.query.paths[:3], cfg)
    img, k = ds[2]
    assert img.shape == (3, 40, 20) and img.dtype == torch.float32 and k == 2
    ref = np.asarray(Image.open(split.query.paths[2]).convert("RGB").resize((20, 40), Image.LANCZOS)) / 255.0
    ref = (ref - np.array(cfg.INPUT.PIXEL_MEAN)) / np.array(cfg.INPUT.PIXEL_STD)
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match="cannot decode image .*bad.jpg"):
        TestImageDataset([bad], cfg)[0]
    with pytest.raises(DatasetError, match="(?s)1 test image.*not found.*missing.jpg"):
        TestImageDataset([str(tmp_path / "missing.jpg")], cfg)
