"""SYSU-MM01 preprocessing and training arrays: released semantics, idempotence, bad input."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data import DatasetError, SamplePair, build_train_set, preprocess_sysu
from data.datasets.sysu import ARRAYS, INFO_FILE, load_training_arrays, training_listing
from utils.config import PROJECT_ROOT, build_config

SIZE = (24, 48)  # (W, H): small, but a real resize of every camera's native size


def _released_reference(root, size):
    """The released pre_process_sysu.py loop, written out independently."""
    ids = []
    for name in ("train_id.txt", "val_id.txt"):
        with open(os.path.join(root, "exp", name)) as f:
            ids += [int(y) for y in f.read().splitlines()[0].split(",")]
    out = {}
    for mod, cams in (("rgb", ["cam1", "cam2", "cam4", "cam5"]), ("ir", ["cam3", "cam6"])):
        files = []
        for pid in sorted("%04d" % x for x in ids):
            for cam in cams:
                d = os.path.join(root, cam, pid)
                if os.path.isdir(d):
                    files += [os.path.join(d, f) for f in sorted(os.listdir(d))]
        out[mod] = files
    pid2label = {pid: label for label, pid in enumerate(sorted({int(p.split(os.sep)[-2]) for p in out["ir"]}))}
    arrays = {}
    for mod, files in out.items():
        arrays[mod + "_img"] = np.stack([np.array(Image.open(p).resize(size, Image.LANCZOS)) for p in files])
        arrays[mod + "_label"] = np.array([pid2label[int(p.split(os.sep)[-2])] for p in files])
    return arrays


@pytest.fixture
def sysu_copy(synthetic_root, tmp_path):
    root = str(tmp_path / "SYSU")
    shutil.copytree(synthetic_root("sysu"), root)
    return root


def test_preprocess_equals_released_loop(sysu_copy):
    summary = preprocess_sysu(sysu_copy, SIZE, workers=2, progress=False)
    assert not summary["skipped"]
    ref = _released_reference(sysu_copy, SIZE)
    for key, name in ARRAYS.items():
        got = np.load(os.path.join(sysu_copy, name))
        assert got.dtype == (np.uint8 if key.endswith("img") else np.int64)
        np.testing.assert_array_equal(got, ref[key])
    assert summary["num_rgb"] == len(ref["rgb_label"]) and summary["num_ir"] == len(ref["ir_label"])
    assert summary["num_ids"] == 6 and sorted(set(ref["rgb_label"].tolist())) == list(range(6))


def test_rerun_is_a_noop_and_size_change_rewrites(sysu_copy):
    preprocess_sysu(sysu_copy, SIZE, progress=False)
    path = os.path.join(sysu_copy, ARRAYS["rgb_img"])
    before = os.stat(path).st_mtime_ns
    assert preprocess_sysu(sysu_copy, SIZE, progress=False)["skipped"]
    assert os.stat(path).st_mtime_ns == before
    assert not preprocess_sysu(sysu_copy, (16, 32), progress=False)["skipped"]
    assert np.load(path, mmap_mode="r").shape[1:] == (32, 16, 3)
    with open(os.path.join(sysu_copy, INFO_FILE)) as f:
        assert json.load(f)["size"] == [16, 32]
    # A changed image invalidates the record.
    img = os.path.join(sysu_copy, training_listing(sysu_copy)["rgb"][0][0])
    Image.new("RGB", (10, 20), (255, 0, 0)).save(img)
    assert not preprocess_sysu(sysu_copy, (16, 32), progress=False)["skipped"]
    np.testing.assert_allclose(np.load(path)[0, 0, 0], [255, 0, 0], atol=4)  # JPEG-saved red
    assert not [f for f in os.listdir(sysu_copy) if f.endswith(".tmp")]


def test_script(sysu_copy, capsys):
    import pre_process_sysu

    assert pre_process_sysu.main(["--root", sysu_copy, "--size", "20", "40"]) == 0
    assert np.load(os.path.join(sysu_copy, ARRAYS["ir_img"])).shape[1:] == (40, 20, 3)
    assert pre_process_sysu.main(["--root", sysu_copy, "--size", "20", "40"]) == 0
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(DatasetError, match="SYSU-MM01 root not found"):
        pre_process_sysu.main(["--root", sysu_copy + "_missing"])
    # The script runs standalone with the sysu config's default root, without importing torch;
    # a missing root is one error line and exit status 1.
    script = os.path.join(PROJECT_ROOT, "pre_process_sysu.py")
    out = subprocess.run([sys.executable, script, "--size", "20", "40"], capture_output=True, text=True,
                         cwd=os.path.dirname(sysu_copy))
    assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert os.path.join("datasets", "SYSU-MM01") in out.stderr
    probe = ("import runpy, sys; sys.argv = ['pre_process_sysu.py', '--size', '20', '40']\n"
             "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)" % script)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=os.path.dirname(sysu_copy),
                         env=dict(os.environ, PYTHONPATH=PROJECT_ROOT))
    assert out.stdout.strip() == "False", out.stderr


def test_train_set_from_arrays(synthetic_root):
    root = synthetic_root("sysu", preprocess=SIZE)
    cfg = build_config("sysu", opts=["DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[48, 24]", "DATALOADER.NUM_IDS", "4"])
    ts = build_train_set(cfg)
    assert ts.num_classes == 6 and all(isinstance(a, np.memmap) for a in ts.images.arrays)
    ref = np.load(os.path.join(root, ARRAYS["rgb_label"]))
    vis, ir = np.flatnonzero(ts.modality == 0), np.flatnonzero(ts.modality == 1)
    np.testing.assert_array_equal(ts.pids[vis], ref)
    np.testing.assert_array_equal(ts.pids[ir], np.load(os.path.join(root, ARRAYS["ir_label"])))
    assert set(ts.camids[vis]) <= {1, 2, 4, 5} and set(ts.camids[ir]) <= {3, 6}
    v, i = ts[SamplePair(0, ir[-1])]
    assert v["images"].shape == (3, 48, 24) and i["images"].shape == (3, 48, 24)
    assert (v["pids"], i["pids"]) == (0, 5) and (v["modality"], i["modality"]) == (0, 1)
    # Pickled for spawned workers, the memory maps are reopened by path, not copied.
    state = pickle.dumps(ts)
    assert len(state) < ts.images.arrays[0].nbytes
    clone = pickle.loads(state)
    assert all(isinstance(a, np.memmap) for a in clone.images.arrays)
    pair = SamplePair(3, ir[4], seed=11)
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
               for a, b in zip(ts[pair], clone[pair]) for k in a)
    held = build_train_set(build_config("sysu", opts=[
        "DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[48, 24]", "DATASET.VAL_IDS", "2", "DATALOADER.NUM_IDS", "4"]))
    assert held.num_classes == 4 and held.pids.max() == 3
    assert int((held.modality == 0).sum()) == int((ref < 4).sum())


def test_arrays_of_another_size_are_refused(synthetic_root):
    root = synthetic_root("sysu", preprocess=SIZE)
    with pytest.raises(DatasetError, match=r"pre_process_sysu.py --root .* --size 32 64"):
        load_training_arrays(root, (32, 64))


def test_missing_arrays_name_the_fix(synthetic_root):
    root = synthetic_root("sysu")
    with pytest.raises(DatasetError, match=r"train_rgb_resized_img.npy.*pre_process_sysu.py"):
        load_training_arrays(root, SIZE)


# ------------------------------------------------------------------ bad input


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="SYSU-MM01 root not found: .*nowhere"):
        preprocess_sysu(str(tmp_path / "nowhere"), SIZE, progress=False)


def test_missing_id_file(sysu_copy):
    os.remove(os.path.join(sysu_copy, "exp", "val_id.txt"))
    with pytest.raises(DatasetError, match=r"id file not found: .*val_id.txt"):
        preprocess_sysu(sysu_copy, SIZE, progress=False)


def test_id_file_naming_absent_folders(sysu_copy):
    ids = open(os.path.join(sysu_copy, "exp", "train_id.txt")).readline().strip()
    with open(os.path.join(sysu_copy, "exp", "train_id.txt"), "w") as f:
        f.write(ids + ",777\n")
    with pytest.raises(DatasetError, match=r"no folder in any camera.*cam1.0777.*0777"):
        preprocess_sysu(sysu_copy, SIZE, progress=False)


def test_identity_in_one_modality_only(sysu_copy):
    pid = int(open(os.path.join(sysu_copy, "exp", "train_id.txt")).readline().split(",")[0])
    for cam in (3, 6):
        shutil.rmtree(os.path.join(sysu_copy, "cam%d" % cam, "%04d" % pid), ignore_errors=True)
    with pytest.raises(DatasetError, match=r"needs RGB and IR images; no IR images .* %04d" % pid):
        preprocess_sysu(sysu_copy, SIZE, progress=False)


def test_corrupt_and_truncated_images_are_named(sysu_copy):
    rels = training_listing(sysu_copy)["rgb"][0]
    broken, truncated = os.path.join(sysu_copy, rels[1]), os.path.join(sysu_copy, rels[3])
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        preprocess_sysu(sysu_copy, SIZE, progress=False)
    assert "2 image(s) could not be read" in str(err.value)
    assert broken in str(err.value) and truncated in str(err.value)
    assert not os.path.exists(os.path.join(sysu_copy, ARRAYS["rgb_img"]))
    assert not [f for f in os.listdir(sysu_copy) if f.endswith(".tmp")]


def test_labels_not_contiguous_in_arrays(synthetic_root, tmp_path):
    root = str(tmp_path / "S")
    shutil.copytree(synthetic_root("sysu", preprocess=SIZE), root)
    for mod in ("rgb", "ir"):
        path = os.path.join(root, ARRAYS[mod + "_label"])
        lab = np.load(path)
        np.save(path, np.where(lab == 2, 9, lab))
    with pytest.raises(DatasetError, match="contiguous 0..C-1.*missing: 2"):
        load_training_arrays(root, SIZE)
