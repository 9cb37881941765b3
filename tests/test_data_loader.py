"""Cross-modality sampler, training sets per layout, the training DataLoader and its batch dicts."""
import os
import shutil

import numpy as np
import pytest
import torch

from data import (
    CrossModalitySampler,
    DatasetError,
    SamplePair,
    build_train_loader,
    build_train_set,
    build_test_split,
)
from data.synthetic import llcm_plan
from utils.config import ConfigError, build_config


def _labels():
    rgb = np.repeat(np.arange(7), [3, 5, 2, 4, 6, 1, 3])
    ir = np.repeat(np.arange(7), [2, 2, 4, 1, 3, 5, 2])
    rng = np.random.default_rng(0)
    return rng.permutation(rgb), rng.permutation(ir)


def test_sampler_invariants():
    rgb, ir = _labels()
    s = CrossModalitySampler(rgb, ir, num_ids=4, num_pos=3, seed=5)
    n = max(len(rgb), len(ir))
    assert s.num_iters == n // 12 + 1 and len(s) == s.num_iters * 12
    pairs = list(s)
    assert len(pairs) == len(s)
    for b in range(s.num_iters):
        batch = pairs[b * 12:(b + 1) * 12]
        lv = [rgb[i] for i, _ in batch]
        li = [ir[j] for _, j in batch]
        assert lv == li  # aligned by position
        runs = [lv[k * 3:(k + 1) * 3] for k in range(4)]
        assert all(len(set(r)) == 1 for r in runs)  # K per identity, grouped
        assert len({r[0] for r in runs}) == 4  # P distinct identities
    assert all(isinstance(p.seed, int) for p in pairs)


def test_sampler_determinism_and_epochs():
    rgb, ir = _labels()
    a = CrossModalitySampler(rgb, ir, 4, 2, seed=1, num_iters=6)
    b = CrossModalitySampler(rgb, ir, 4, 2, seed=1, num_iters=6)
    first = list(a)
    a.set_epoch(3)
    third = list(a)
    b.set_epoch(3)
    assert list(b) == third and [p.seed for p in b] == [p.seed for p in third]
    assert third != first
    b.set_epoch(0)
    assert list(b) == first
    assert list(CrossModalitySampler(rgb, ir, 4, 2, seed=2, num_iters=6)) != first


def test_sampler_draws_uniformly_with_replacement():
    rgb = np.repeat(np.arange(3), [4, 1, 2])
    ir = np.repeat(np.arange(3), [1, 2, 3])
    s = CrossModalitySampler(rgb, ir, 3, 4, seed=0, num_iters=400)
    i_rgb, _, _ = s.plan()
    picks = i_rgb[:, :, :].reshape(-1)
    counts = np.bincount(picks, minlength=7)
    # identity 0 has 4 images: each drawn ~1/4 of identity 0's 1600 draws
    np.testing.assert_allclose(counts[:4] / 1600, 0.25, atol=0.04)
    assert counts[4] == 1600  # the single image of identity 1, repeated (with replacement)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_shards_are_disjoint_and_cover_the_global_batch(world_size):
    rgb, ir = _labels()
    full = CrossModalitySampler(rgb, ir, 6, 2, seed=3, num_iters=5)
    full.set_epoch(2)
    glob = list(full)
    shards = []
    for r in range(world_size):
        s = CrossModalitySampler(rgb, ir, 6, 2, seed=3, num_iters=5, rank=r, world_size=world_size)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == 5 * 12 // world_size
    per = 12 // world_size
    for b in range(5):
        parts = [sh[b * per:(b + 1) * per] for sh in shards]
        assert sum(parts, []) == glob[b * 12:(b + 1) * 12]
        ids = [{rgb[i] for i, _ in p} for p in parts]
        assert all(not (ids[x] & ids[y]) for x in range(world_size) for y in range(x + 1, world_size))
        assert [q.seed for q in sum(parts, [])] == [q.seed for q in glob[b * 12:(b + 1) * 12]]


def test_sampler_rejects_bad_settings():
    rgb, ir = _labels()
    with pytest.raises(ValueError, match="divisible by the world size"):
        CrossModalitySampler(rgb, ir, 4, 2, world_size=3)
    with pytest.raises(ValueError, match="only 7 training identities"):
        CrossModalitySampler(rgb, ir, 8, 2)


def test_loader_batches_and_worker_independence(tiny_demo_cfg):
    cfg = tiny_demo_cfg.clone()
    cfg.defrost()
    cfg.SOLVER.ITERS_PER_EPOCH = 3
    loader, sampler, ts = build_train_loader(cfg)
    assert len(loader) == 3 and ts.num_classes == 12
    sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert sorted(b) == ["camids", "images", "index", "modality", "pids"]
    v, i, lv, li = b["images"][:8], b["images"][8:], b["pids"][:8], b["pids"][8:]
    size = (8, 3) + tuple(cfg.INPUT.SIZE_TRAIN)
    assert v.shape == size and i.shape == size and v.dtype == torch.float32
    assert b["modality"].tolist() == [0] * 8 + [1] * 8
    assert torch.equal(b["pids"], torch.from_numpy(ts.pids[b["index"].numpy()]))
    assert lv.dtype == torch.int64 and torch.equal(lv, li)
    assert torch.equal(lv[0::2], lv[1::2])  # runs of K = 2
    sampler.set_epoch(1)
    again = list(loader)
    assert all(torch.equal(bx[k], by[k]) for bx, by in zip(batches, again) for k in bx)
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.DATALOADER.PERSISTENT_WORKERS = True
    loader2, sampler2, _ = build_train_loader(cfg)
    sampler2.set_epoch(1)
    workers = list(loader2)
    assert all(torch.equal(bx[k], by[k]) for bx, by in zip(batches, workers) for k in bx)
    assert loader2.persistent_workers and not loader2.pin_memory
    default = build_train_loader(build_config("demo", opts=["DATASET.ROOT", cfg.DATASET.ROOT,
                                                            "DATASET.DEMO_TRAIN_IDS", "12", "DATASET.DEMO_TEST_IDS", "8"]))
    n = max(int((ts.modality == 0).sum()), int((ts.modality == 1).sum()))
    assert len(default[0]) == n // 24 + 1  # released int(N / (P*K)) + 1 with P=6, K=4


def test_loader_ddp_rank_batches(tiny_demo_cfg):
    cfg = tiny_demo_cfg.clone()
    cfg.defrost()
    cfg.SOLVER.ITERS_PER_EPOCH = 2
    loader, sampler, _ = build_train_loader(cfg, rank=1, world_size=2)
    assert loader.batch_size == 4 and len(loader) == 2
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        build_train_loader(cfg, rank=0, world_size=3)


def test_demo_dataset_is_idempotent(tiny_demo_cfg):
    from data import ensure_demo_dataset

    root = tiny_demo_cfg.DATASET.ROOT
    stamp = os.stat(os.path.join(root, "train_rgb_resized_img.npy")).st_mtime_ns
    ensure_demo_dataset(tiny_demo_cfg)
    assert os.stat(os.path.join(root, "train_rgb_resized_img.npy")).st_mtime_ns == stamp
    split = build_test_split(tiny_demo_cfg)
    assert split.info["dataset"] == "demo" and split.info["num_ids"] == 8 and len(split.trials) == 2
    assert oct(os.stat(root).st_mode & 0o777) != oct(0o700)
    assert not [f for f in os.listdir(os.path.dirname(root)) if f.endswith(".tmp")]


def test_demo_refuses_foreign_folder(tmp_path):
    from data import ensure_demo_dataset

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = build_config("demo", opts=["DATASET.ROOT", str(tmp_path / "mine")])
    with pytest.raises(DatasetError, match="not a generated demo dataset"):
        ensure_demo_dataset(cfg)


@pytest.mark.parametrize("layout", ["regdb", "llcm"])
def test_listed_train_sets(synthetic_root, layout):
    root = synthetic_root(layout)
    cfg = build_config(layout, opts=["DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[32, 16]", "DATALOADER.NUM_IDS", "2",
                                     "DATASET.TRIAL", "4"])
    ts = build_train_set(cfg)
    if layout == "regdb":
        assert ts.num_classes == 3 and (ts.modality == 0).sum() == 9 and (ts.modality == 1).sum() == 9
        assert set(ts.camids[ts.modality == 0]) == {1} and set(ts.camids[ts.modality == 1]) == {2}
        rels = [line.split(" ")[0] for line in open(os.path.join(root, "idx", "train_visible_4.txt"))]
    else:
        plan = llcm_plan(4, 4, 0, 2)
        train = set(plan["train"])
        n_vis = sum(n for (mod, _, pid), n in plan["counts"].items() if mod == "vis" and pid in train)
        n_nir = sum(n for (mod, _, pid), n in plan["counts"].items() if mod == "nir" and pid in train)
        assert ts.num_classes == 4 and (ts.modality == 0).sum() == n_vis and (ts.modality == 1).sum() == n_nir
        rels = [line.split(" ")[0] for line in open(os.path.join(root, "idx", "train_vis.txt"))]
    from PIL import Image

    ref = np.asarray(Image.open(os.path.join(root, rels[0])).convert("RGB").resize((16, 32), Image.LANCZOS))
    np.testing.assert_array_equal(ts.images[0], ref)
    first_ir = int(np.flatnonzero(ts.modality == 1)[0])
    v, i = ts[SamplePair(0, first_ir)]
    assert v["images"].shape == (3, 32, 16) and i["images"].shape == (3, 32, 16)
    assert (v["modality"], i["modality"]) == (0, 1) and v["index"] == 0 and i["index"] == first_ir


def _rewrite(path, fn):
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(fn(lines)) + "\n")


def test_listed_bad_input(synthetic_root, tmp_path):
    root = str(tmp_path / "R")
    shutil.copytree(synthetic_root("regdb"), root)
    cfg = build_config("regdb", opts=["DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[32, 16]", "DATALOADER.NUM_IDS", "2"])
    vis = os.path.join(root, "idx", "train_visible_1.txt")
    the = os.path.join(root, "idx", "train_thermal_1.txt")
    original = open(vis).read()
    _rewrite(vis, lambda ls: [ln.rsplit(" ", 1)[0] + " " + str(int(ln.rsplit(" ", 1)[1]) * 2) for ln in ls])
    with pytest.raises(DatasetError, match="labels only in .*train_visible_1.txt: 4"):
        build_train_set(cfg)
    _rewrite(the, lambda ls: [ln.rsplit(" ", 1)[0] + " " + str(int(ln.rsplit(" ", 1)[1]) * 2) for ln in ls])
    with pytest.raises(DatasetError, match="contiguous 0..C-1.*missing: 1, 3"):
        build_train_set(cfg)
    with open(vis, "w") as f:
        f.write(original)
    _rewrite(the, lambda ls: [ln.rsplit(" ", 1)[0] + " " + str(int(ln.rsplit(" ", 1)[1]) // 2) for ln in ls])
    bad = os.path.join(root, original.split(" ")[0])
    with open(bad, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError, match="(?s)1 image.*could not be read.*" + os.path.basename(bad) + ".*truncated"):
        build_train_set(cfg)
    shutil.rmtree(os.path.join(root, "idx"))
    with pytest.raises(DatasetError, match="list file not found: .*train_visible_1.txt"):
        build_train_set(cfg)
    with pytest.raises(DatasetError, match="RegDB root not found"):
        build_train_set(build_config("regdb", opts=["DATASET.ROOT", root + "_x"]))
    with pytest.raises(DatasetError, match="LLCM root not found"):
        build_train_set(build_config("llcm", opts=["DATASET.ROOT", root + "_x"]))


def test_val_ids_bounds(tiny_demo_cfg):
    cfg = tiny_demo_cfg.clone()
    cfg.defrost()
    cfg.DATASET.VAL_IDS = 10
    with pytest.raises(ConfigError, match="NUM_IDS = 4"):
        build_train_set(cfg)
    cfg.DATASET.VAL_IDS = 3
    ts = build_train_set(cfg)
    assert ts.num_classes == 9 and ts.pids[ts.modality == 0].max() == 8 and ts.pids[ts.modality == 1].max() == 8


def test_concurrent_first_use_of_the_demo(tmp_path):
    import subprocess
    import sys

    from utils.config import PROJECT_ROOT

    root = str(tmp_path / "demo")
    code = ("import sys; from utils.config import build_config; from data.datasets.demo import ensure_demo_dataset; "
            "cfg = build_config('demo', opts=['DATASET.ROOT', sys.argv[1], 'DATASET.DEMO_TRAIN_IDS', '3', "
            "'DATASET.DEMO_TEST_IDS', '2']); ensure_demo_dataset(cfg, workers=1)")
    procs = [subprocess.Popen([sys.executable, "-c", code, root], cwd=PROJECT_ROOT, stderr=subprocess.PIPE)
             for _ in range(2)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no temporary folder left behind
    assert "train_rgb_resized_img.npy" in os.listdir(root)
