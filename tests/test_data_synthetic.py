"""Synthetic datasets: exact on-disk layouts, determinism, official .mat format, the CLI."""
import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from data.synthetic import (
    SYSU_CAM_SIZES,
    llcm_plan,
    make_camera,
    make_identity,
    render,
    sysu_plan,
    write_regdb,
    write_sysu,
)
from utils.config import PROJECT_ROOT


def _tree_digest(root):
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".mat"):
                continue  # savemat writes a creation timestamp into the header
            rel = os.path.relpath(os.path.join(folder, name), root)
            h.update(rel.encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_sysu_layout_matches_plan(synthetic_root):
    root = synthetic_root("sysu")
    plan = sysu_plan(4, 2, 6, 0, 3)
    found = {}
    for cam in range(1, 7):
        for pid_dir in os.listdir(os.path.join(root, "cam%d" % cam)):
            assert re.fullmatch(r"\d{4}", pid_dir)
            names = sorted(os.listdir(os.path.join(root, "cam%d" % cam, pid_dir)))
            assert names == ["%04d.jpg" % k for k in range(1, len(names) + 1)]
            found[(cam, int(pid_dir))] = len(names)
            size = Image.open(os.path.join(root, "cam%d" % cam, pid_dir, names[0])).size
            assert size == SYSU_CAM_SIZES[cam]
    assert found == plan["counts"]
    for name in ("train", "val", "test"):
        with open(os.path.join(root, "exp", "%s_id.txt" % name)) as f:
            assert [int(x) for x in f.readline().split(",")] == plan[name]
    ids = plan["train"] + plan["val"] + plan["test"]
    assert len(set(ids)) == 12
    # Every id: at least one RGB camera and one IR camera.
    for pid in ids:
        assert any((c, pid) in found for c in (1, 2, 4, 5)) and any((c, pid) in found for c in (3, 6))


def test_sysu_official_permutation_file(synthetic_root):
    # Read the way MPANet / MCJA read the real file: loadmat, index the cells, format the raw
    # numbers with an integer format code (no cast to int first).
    root = synthetic_root("sysu")
    cells = loadmat(os.path.join(root, "exp", "rand_perm_cam.mat"))["rand_perm_cam"]
    plan = sysu_plan(4, 2, 6, 0, 3)
    max_id = max(pid for _, pid in plan["counts"])
    assert cells.shape == (6, 1) and cells.dtype == object  # 6 x 1 cell, one cell per camera
    for cam in range(1, 7):
        cam_cell = cells[cam - 1][0]
        assert cam_cell.dtype == object and cam_cell.shape == (max_id, 1)  # N x 1, indexed by real id - 1
        per_id = cam_cell.squeeze()
        assert len(per_id) == max_id
        for pid in range(1, max_id + 1):
            n = plan["counts"].get((cam, pid), 0)
            perm = per_id[pid - 1]
            assert perm is cam_cell[pid - 1, 0]
            assert perm.dtype == np.uint8 and perm.shape == (10, n)  # 10 x 0 where no images
            if n == 0:
                assert perm[3][:1].tolist() == []  # a trial row of an empty cell is empty
                continue
            for trial, row in enumerate(perm):
                value = perm[trial][0]
                assert value.dtype == np.uint8
                assert "%04d" % value == "%04d" % row[0] and 1 <= value <= n
                names = ["cam{}/{:0>4d}/{:0>4d}".format(cam, pid, x) for x in perm[trial][:10].tolist()]
                assert sorted(names) == ["cam%d/%04d/%04d" % (cam, pid, k) for k in range(1, n + 1)]
                assert all(os.path.isfile(os.path.join(root, name + ".jpg")) for name in names)


def test_rand_perm_cam_rejects_counts_beyond_uint8():
    from data.synthetic import _rand_perm_cam

    cells = _rand_perm_cam({(2, 1): 255}, 1, 0)
    assert cells[1, 0][0, 0].dtype == np.uint8 and cells[1, 0][0, 0].max() == 255 and cells[1, 0].shape == (1, 1)
    with pytest.raises(ValueError, match="uint8"):
        _rand_perm_cam({(2, 1): 256}, 1, 0)


def test_generation_is_deterministic_and_parallel_safe(tmp_path):
    write_sysu(str(tmp_path / "a"), 2, 1, 2, seed=3, images_per_cam=2, workers=1)
    write_sysu(str(tmp_path / "b"), 2, 1, 2, seed=3, images_per_cam=2, workers=2)
    write_sysu(str(tmp_path / "c"), 2, 1, 2, seed=4, images_per_cam=2, workers=1)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_infrared_images_have_no_colour_and_bright_skin():
    ident = make_identity(0, 7)
    ir = np.asarray(render(ident, make_camera(0, 3, True, (64, 128)), np.random.default_rng(1))).astype(int)
    vis = np.asarray(render(ident, make_camera(0, 1, False, (64, 128)), np.random.default_rng(1))).astype(int)
    assert (ir[..., 0] == ir[..., 1]).all() and (ir[..., 1] == ir[..., 2]).all()
    assert np.abs(vis[..., 0] - vis[..., 2]).mean() > 3
    skin = ident.thermal[1]
    clothes = [ident.thermal[k] for k in (3, 4, 5, 6)]
    assert skin > max(clothes)


def test_regdb_layout(synthetic_root):
    root = synthetic_root("regdb")
    for word, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        for split in ("train", "test"):
            for trial in range(1, 11):
                path = os.path.join(root, "idx", "%s_%s_%d.txt" % (split, word, trial))
                lines = open(path).read().split("\n")[:-1]
                assert len(lines) == 3 * 3  # 3 ids x 3 images
                labels = [int(line.split(" ")[1]) for line in lines]
                assert sorted(set(labels)) == [0, 1, 2]
                for line in lines:
                    rel = line.split(" ")[0]
                    assert rel.startswith(folder + "/") and rel.endswith(".bmp")
                    assert os.path.isfile(os.path.join(root, rel))
    # The visible and thermal test lists carry the same label sequence, as in the real RegDB
    # (the released test code relies on it when it swaps the query and gallery labels).
    vis = [line.split(" ")[1] for line in open(os.path.join(root, "idx", "test_visible_4.txt"))]
    the = [line.split(" ")[1] for line in open(os.path.join(root, "idx", "test_thermal_4.txt"))]
    assert vis == the


def test_llcm_layout(synthetic_root):
    root = synthetic_root("llcm")
    plan = llcm_plan(4, 4, 0, 2)
    name = re.compile(r"(\d{4})_c(\d{2})_s\d{6}_f\d+_(vis|nir)\.jpg")
    with open(os.path.join(root, "idx", "test_id.txt")) as f:
        assert [int(x) for x in f.readline().split(",")] == plan["test"]
    assert not os.path.exists(os.path.join(root, "test_nir", "cam3"))
    count = 0
    for mod in ("vis", "nir"):
        for cam in os.listdir(os.path.join(root, "test_" + mod)):
            for pid in os.listdir(os.path.join(root, "test_" + mod, cam)):
                for f in os.listdir(os.path.join(root, "test_" + mod, cam, pid)):
                    m = name.fullmatch(f)
                    assert m and m.group(1) == pid and int(m.group(2)) == int(cam[3:]) and m.group(3) == mod
                    count += 1
        lines = open(os.path.join(root, "idx", "train_%s.txt" % mod)).read().split("\n")[:-1]
        assert sorted({int(x.split(" ")[1]) for x in lines}) == list(range(4))
        for line in lines:
            assert line.startswith(mod + "/") and os.path.isfile(os.path.join(root, line.split(" ")[0]))
    expected = sum(n for (mod, cam, pid), n in plan["counts"].items() if pid in plan["test"])
    assert count == expected


def test_cli_writes_layout(tmp_path):
    root = tmp_path / "rd"
    out = subprocess.run(
        [sys.executable, os.path.join(PROJECT_ROOT, "tools", "make_synthetic_dataset.py"), "--layout", "regdb",
         "--root", str(root), "--ids", "4", "--images", "2", "--workers", "1"],
        capture_output=True, text=True, cwd=PROJECT_ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert len(open(root / "idx" / "train_visible_1.txt").readlines()) == 4
    write_regdb(str(tmp_path / "again"), 4, 0, 2)
    assert _tree_digest(root) == _tree_digest(tmp_path / "again")
