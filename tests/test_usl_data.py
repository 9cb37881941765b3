"""Pseudo-labelled training data of the unsupervised recipe on synthetic SYSU (demo) and RegDB
trees: released order and cameras, samples and their views, the two loaders (worker count,
resume, labels never read), extraction and pre-resized images."""
import os

import numpy as np
import pytest
import torch

from data.datasets.demo import DemoDataset
from data.datasets.regdb import RegDB
from data.errors import DatasetError
from data.pseudo import (ExtractionSet, PseudoLabelSet, build_pseudo_loader, collate_views, usl_listings)
from data.samplers.base import SampleIndex
from data.samplers.multiple_gallery import camera_slot
from data.usl_transforms import AugRng, ClusterTransform, build_train_views, reference_params
from utils.config import build_config
from utils.errors import ConfigError

SIZE = (32, 16)


def _views(recipe="sysu", stage="stage1"):
    return build_train_views(reference_params(recipe, stage)._replace(size=SIZE))


@pytest.fixture(scope="module")
def demo(tiny_demo_root):
    cfg = build_config("demo", opts=["DATASET.ROOT", tiny_demo_root], validate=False)
    return usl_listings(DemoDataset(cfg)), tiny_demo_root


@pytest.fixture(scope="module")
def regdb(synthetic_root):
    root = synthetic_root("regdb", num_ids=24)  # 12 training ids, labels 0..11 (two digits)
    cfg = build_config("regdb", opts=["DATASET.ROOT", root, "DATASET.TRIAL", "2"], validate=False)
    return usl_listings(RegDB(cfg)), root


def _converted_names(root, cams):
    """The released conversion's training file names, <id>_c<cam>_<file>, walked on disk."""
    with open(os.path.join(root, "exp", "train_id.txt")) as f:
        ids = [int(x) for x in f.readline().split(",")]
    with open(os.path.join(root, "exp", "val_id.txt")) as f:
        ids += [int(x) for x in f.readline().split(",")]
    names = []
    for cam in cams:
        for pid in ids:
            folder = os.path.join(root, "cam%d" % cam, "%04d" % pid)
            if os.path.isdir(folder):
                names += ["%04d_c%d_%s" % (pid, cam, n) for n in os.listdir(folder)]
    return sorted(names)


def test_sysu_listing_is_the_released_sorted_order_with_0_based_cameras(demo):
    (rgb, ir), root = demo
    for listing, cams, modality in ((rgb, (1, 2, 4, 5), 0), (ir, (3, 6), 1)):
        names = ["%s_c%d_%s" % (p.split(os.sep)[-2], int(p.split(os.sep)[-3][3:]), os.path.basename(p))
                 for p in listing.paths]
        assert names == _converted_names(root, cams)
        assert listing.cams.tolist() == [int(p.split(os.sep)[-3][3:]) - 1 for p in listing.paths]
        assert set(listing.cams.tolist()) <= {c - 1 for c in cams} and listing.modality == modality
        assert listing.rows.tolist() == list(range(len(listing)))
    # true identities: labels 0..C-1 in ascending id order, shared by both modalities
    ids = sorted({int(p.split(os.sep)[-2]) for p in rgb.paths})
    assert rgb.true_pids.tolist() == [ids.index(int(p.split(os.sep)[-2])) for p in rgb.paths]
    assert set(ir.true_pids.tolist()) == set(range(len(ids)))


def test_regdb_listing_sorts_by_the_unpadded_label_name_with_camera_0(regdb):
    (rgb, ir), root = regdb
    for listing, word in ((rgb, "visible"), (ir, "thermal")):
        with open(os.path.join(root, "idx", "train_%s_2.txt" % word)) as f:
            rows = [line.split() for line in f if line.strip()]
        expected = sorted("%s_c1_%s" % (label, os.path.basename(rel)) for rel, label in rows)
        got = ["%d_c1_%s" % (pid, os.path.basename(p)) for p, pid in zip(listing.paths, listing.true_pids.tolist())]
        assert got == expected and listing.cams.tolist() == [0] * len(rows)
    assert rgb.true_pids.tolist()[:4] != sorted(rgb.true_pids.tolist())[:4]  # "10_..." sorts before "2_..."


def test_camera_subset_keeps_global_rows(demo):
    (rgb, _), _ = demo
    cam = int(rgb.cams[-1])
    sub = rgb.camera(cam)
    assert set(sub.cams.tolist()) == {cam} and sub.rows.tolist() == np.flatnonzero(rgb.cams == cam).tolist()
    assert sub.paths == [rgb.paths[i] for i in sub.rows]
    with pytest.raises(DatasetError, match="no visible training images of camera 2"):
        rgb.camera(2)


def test_other_datasets_are_refused(synthetic_root):
    from data.datasets.llcm import LLCM

    cfg = build_config("llcm", opts=["DATASET.ROOT", synthetic_root("llcm")], validate=False)
    with pytest.raises(ConfigError, match="SYSU-MM01 .* or RegDB"):
        usl_listings(LLCM(cfg))


def _labels(listing):
    """Pseudo labels: the true ids scrambled, a few outliers."""
    labels = (listing.true_pids * 7 + 3) % 11
    labels[::9] = -1
    return labels


def test_rgb_sample_has_two_views_from_one_seeded_stream(demo):
    (rgb, _), _ = demo
    views = _views()
    ds = PseudoLabelSet(rgb, [views["rgb"], views["rgb2"]], _labels(rgb))
    i = int(np.flatnonzero(ds.labels >= 0)[3])
    sample = ds[SampleIndex(i, 1234)]
    assert sample["images"].shape == (2, 3) + SIZE
    assert sample["pids"] == ds.labels[i] and sample["camids"] == rgb.cams[i] and sample["index"] == i
    assert sample["modality"] == 0
    rng = AugRng.from_seed(1234)
    first = views["rgb"](rgb.paths[i], rng)
    second = views["rgb2"](rgb.paths[i], rng)
    assert torch.equal(sample["images"][0], first) and torch.equal(sample["images"][1], second)
    assert torch.equal(ds[SampleIndex(i, 1234)]["images"], sample["images"])
    with pytest.raises(IndexError, match="outlier"):
        ds[SampleIndex(int(np.flatnonzero(ds.labels < 0)[0]), 1)]


def test_collate_views_puts_views_in_row_blocks():
    samples = [{"images": torch.stack([torch.full((3, 2, 1), 10.0 * k), torch.full((3, 2, 1), 10.0 * k + 1)]),
                "pids": k, "camids": 5, "modality": 0, "index": 100 + k} for k in range(3)]
    batch = collate_views(samples)
    assert batch["images"].shape == (6, 3, 2, 1)
    assert batch["images"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert batch["pids"].tolist() == [0, 1, 2, 0, 1, 2] and batch["index"].tolist() == [100, 101, 102] * 2
    assert all(batch[k].dtype == torch.int64 for k in ("pids", "camids", "modality", "index"))


def _epoch_batches(rgb, ir, epoch=1, workers=0, rgb_listing_pids=None):
    views = _views("sysu", "stage2")
    rgb_set = PseudoLabelSet(rgb, [views["rgb"], views["rgb2"]])
    ir_set = PseudoLabelSet(ir, [views["ir"]])
    out = []
    for stream, (ds, listing, batch) in enumerate(((rgb_set, rgb, 4), (ir_set, ir, 8))):
        loader, sampler = build_pseudo_loader(ds, _labels(listing), camera_slot(listing.cams, "index"), batch, 4,
                                              num_iters=3, seed=11, stream=stream, epoch=epoch, workers=workers)
        out.append(list(loader))
    return out


def test_dual_loaders_give_the_epochs_batches(demo):
    (rgb, ir), _ = demo
    rgb_batches, ir_batches = _epoch_batches(rgb, ir)
    assert len(rgb_batches) == len(ir_batches) == 3
    for b in rgb_batches:
        assert b["images"].shape == (8, 3) + SIZE and torch.equal(b["index"][:4], b["index"][4:])
        assert (b["modality"] == 0).all() and torch.equal(b["pids"], torch.from_numpy(_labels(rgb)[b["index"].numpy()]))
        x = b["images"][4:]  # view 2: one channel copied into all three
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    for b in ir_batches:
        assert b["images"].shape == (8, 3) + SIZE and (b["modality"] == 1).all()
        assert (b["pids"] >= 0).all() and torch.equal(b["camids"], torch.from_numpy(ir.cams[b["index"].numpy()]))


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batches_do_not_depend_on_workers_and_resume_exactly(demo):
    (rgb, ir), _ = demo
    reference = _epoch_batches(rgb, ir, epoch=2)
    with_workers = _epoch_batches(rgb, ir, epoch=2, workers=2)
    assert all(_same(a, b) for a, b in zip(reference, with_workers))
    other_epoch = _epoch_batches(rgb, ir, epoch=3)
    assert not _same(reference[0], other_epoch[0])


def test_true_identities_are_never_read(demo):
    (rgb, ir), _ = demo
    reference = _epoch_batches(rgb, ir)
    for scramble in (lambda p: np.random.default_rng(0).permutation(p), lambda p: np.zeros_like(p)):
        changed = [l.subset(np.arange(len(l))) for l in (rgb, ir)]
        for l in changed:
            l.true_pids = scramble(l.true_pids)
        # the pseudo labels stay those of the unchanged listings
        views = _views("sysu", "stage2")
        for stream, (listing, orig, batch, vs) in enumerate(((changed[0], rgb, 4, [views["rgb"], views["rgb2"]]),
                                                             (changed[1], ir, 8, [views["ir"]]))):
            loader, _ = build_pseudo_loader(PseudoLabelSet(listing, vs), _labels(orig),
                                            camera_slot(listing.cams, "index"), batch, 4, num_iters=3, seed=11,
                                            stream=stream, epoch=1)
            assert _same(list(loader), reference[stream])


def test_regdb_pseudo_loader_runs_with_camera_slots(regdb):
    (rgb, ir), _ = regdb
    views = _views("regdb", "stage1")
    loader, sampler = build_pseudo_loader(PseudoLabelSet(ir, [views["ir"]]), ir.true_pids % 4,
                                          camera_slot(ir.cams, "camera"), 8, 4, num_iters=2, seed=0)
    batches = list(loader)
    assert len(batches) == 2 and all(b["images"].shape == (8, 3) + SIZE for b in batches)
    assert all((b["camids"] == 0).all() for b in batches)


def test_extraction_set_and_preloaded_images(demo):
    (_, ir), _ = demo
    transform = ClusterTransform(SIZE)
    shard = ExtractionSet(ir, transform, positions=np.arange(1, len(ir), 2))
    item = shard[2]
    assert item["index"] == 5 and torch.equal(item["images"], transform(ir.paths[5]))
    pre = ir.preloaded(SIZE, workers=2)
    assert pre.images.shape == (len(ir),) + SIZE + (3,) and pre.paths == ir.paths
    # a bicubic pre-resize is exact for transforms that resize first with bicubic
    assert all(torch.equal(ExtractionSet(pre, transform)[i]["images"], transform(ir.paths[i])) for i in (0, 7))
    views = _views("sysu", "stage1")
    labels = _labels(ir)
    i = int(np.flatnonzero(labels >= 0)[0])
    a = PseudoLabelSet(ir, [views["ir"]], labels)[SampleIndex(i, 99)]
    b = PseudoLabelSet(pre, [views["ir"]], labels)[SampleIndex(i, 99)]
    assert torch.equal(a["images"], b["images"])
