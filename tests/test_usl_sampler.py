"""The multiple-gallery sampler against the released sampler's golden index lists
(tests/golden/cmag/sampler.pt) and the project's sampler contract (epochs, seeds, DDP)."""
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch

from data.errors import DatasetError
from data.samplers.base import SampleIndex
from data.samplers.multiple_gallery import (MultipleGallerySampler, ReleasedDraws, SeededDraws, camera_slot,
                                            label_groups, one_pass)
from data.samplers.registry import SAMPLERS
from utils.errors import ConfigError

GOLDEN = torch.load(os.path.join(os.path.dirname(__file__), "golden", "cmag", "sampler.pt"), weights_only=True)
STAGE1 = GOLDEN["inputs"]["data_source_stage1"]
LABELS = [row[1] for row in STAGE1]
CAMS = [row[2] for row in STAGE1]
SLOT = {"stage1_real_cams": "camera", "stage2_index_in_cam_slot": "index"}


@pytest.mark.parametrize("case", GOLDEN["outputs"], ids=lambda c: "%s-%d" % (c["data"], c["seed"]))
def test_one_pass_matches_golden(case):
    source = GOLDEN["inputs"]["data_source_stage1" if case["data"].startswith("stage1") else "data_source_stage2"]
    slots = camera_slot(CAMS, SLOT[case["data"]])
    assert slots.tolist() == [row[2] for row in source]
    sampler = MultipleGallerySampler([row[1] for row in source], slots, num_instances=4, batch_size=4)
    assert sampler.pass_items(ReleasedDraws.from_seed(case["seed"])) == case["indices"]
    torch.manual_seed(case["seed"])
    random.seed(case["seed"])
    np.random.seed(case["seed"])
    assert sampler.pass_items(ReleasedDraws.global_state()) == case["indices"]


def test_registered_and_first_appearance_label_order():
    assert SAMPLERS.get("multiple_gallery") is MultipleGallerySampler
    groups = label_groups([5, -1, 2, 5, 2, 9, -1])
    assert [(label, m.tolist()) for label, m in groups] == [(5, [0, 3]), (2, [2, 4]), (9, [5])]


def _blocks(labels, items):
    """Split a pass into its per-label blocks (consecutive items of one label)."""
    blocks = []
    for i in items:
        if blocks and labels[blocks[-1][0]] == labels[i] and len(blocks[-1]) < 4:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def test_pass_rules_on_a_hand_made_list():
    # label 0: 5 images in camera 0, 5 in camera 1 -> 3 distinct other-camera images;
    # label 1: 2 images in camera 0, 1 in camera 2 -> anchor + with-replacement draws;
    # label 2: 3 images of one camera -> other images of the label; label 3: one image;
    # label -1: outliers, never drawn.
    labels = np.array([0] * 10 + [1] * 3 + [2] * 3 + [3] + [-1] * 4)
    cams = np.array([0] * 5 + [1] * 5 + [0, 0, 2] + [4] * 3 + [5] + [0] * 4)
    for seed in range(20):
        items = one_pass(label_groups(labels), cams, 4, SeededDraws(np.random.default_rng(seed)))
        assert len(items) == 4 * 3 + 1 and all(labels[i] >= 0 for i in items)
        blocks = {labels[b[0]]: b for b in _blocks(labels, items)}
        a, *rest = blocks[0]
        assert len(set(rest)) == 3 and all(cams[i] != cams[a] for i in rest)
        a, *rest = blocks[1]
        assert all(cams[i] != cams[a] for i in rest) and len(rest) == 3
        a, *rest = blocks[2]
        assert a not in rest and len(rest) == 3 and set(rest) <= {13, 14, 15}
        assert blocks[3] == [16]


def test_index_in_camera_slot_means_any_other_image():
    labels = np.array([0] * 6 + [1] * 5)
    cams = np.zeros(11, np.int64)  # one real camera: stage 1 would fall back to "other images"
    items = one_pass(label_groups(labels), camera_slot(cams, "index"), 4, SeededDraws(np.random.default_rng(0)))
    for block in _blocks(labels, items):
        assert len(block) == 4 and len(set(block)) == 4  # >= 4 candidates: without replacement


def test_epoch_is_num_iters_batches_of_cut_passes():
    labels = np.repeat(np.arange(3), 5)[:13]  # 3 labels (5, 5, 3 images) -> 12 items per pass
    cams = np.arange(13) % 2
    s = MultipleGallerySampler(labels, cams, num_instances=4, batch_size=8, num_iters=3, seed=4, stream=2)
    passes = [one_pass(s.groups, s.cams, 4, SeededDraws(np.random.default_rng([4, 2, 0, 0, p]))) for p in range(3)]
    assert all(len(p) == 12 for p in passes)
    expected = passes[0][:8] + passes[1][:8] + passes[2][:8]  # each pass loses its short last batch
    assert s.epoch_items().tolist() == expected and len(s) == 24
    ref = MultipleGallerySampler(labels, cams, 4, 8, num_iters=3, seed=4, stream=2, order="reference")
    draws = ReleasedDraws.from_seed(np.random.default_rng([4, 2, 0, 2]).integers(0, 2**32))
    continued = []
    for _ in range(3):
        continued += ref.pass_items(draws)[:8]  # one stream, continued from pass to pass
    assert ref.epoch_items().tolist() == continued
    assert [int(i) for i in list(iter(s))] == expected and all(isinstance(i, SampleIndex) for i in s)


def test_one_pass_epoch_when_num_iters_is_zero():
    s = MultipleGallerySampler(LABELS, CAMS, num_instances=4, batch_size=8, seed=1)
    assert len(s) == 16  # 21 items per pass, two full batches
    assert s.plan()[0].shape == (2, 8)


@pytest.mark.parametrize("order", ["seeded", "reference"])
def test_epochs_are_reproducible_and_independent_of_history(order):
    def make():
        return MultipleGallerySampler(LABELS, camera_slot(CAMS, "index"), 4, 8, num_iters=5, seed=3, order=order)

    walked = make()
    for e in range(4):
        walked.set_epoch(e)
    walked.set_epoch(2)
    fresh = make()
    fresh.set_epoch(2)
    key = [(int(i), i.seed) for i in walked]
    assert key == [(int(i), i.seed) for i in fresh]
    built = MultipleGallerySampler(LABELS, camera_slot(CAMS, "index"), 4, 8, num_iters=5, seed=3, order=order, epoch=2)
    assert key == [(int(i), i.seed) for i in built]
    fresh.set_epoch(3)
    assert [int(i) for i in fresh] != [k for k, _ in key]
    other_stream = MultipleGallerySampler(LABELS, CAMS, 4, 8, num_iters=5, seed=3, order=order, stream=1, epoch=2)
    assert [int(i) for i in other_stream] != [k for k, _ in key]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_ranks_split_every_global_batch_with_the_same_seeds(world_size):
    whole = MultipleGallerySampler(LABELS, CAMS, 4, 8, num_iters=6, seed=5, epoch=1)
    shards = [MultipleGallerySampler(LABELS, CAMS, 4, 8, num_iters=6, seed=5, epoch=1, rank=r, world_size=world_size)
              for r in range(world_size)]
    per = 8 // world_size
    assert all(sh.batch_size == per and len(sh) == 6 * per for sh in shards)
    flat = [[(int(i), i.seed) for i in sh] for sh in shards]
    joined = [x for b in range(6) for sh in flat for x in sh[b * per:(b + 1) * per]]
    assert joined == [(int(i), i.seed) for i in whole]
    assert len({i.seed for i in whole}) == len(whole)


def test_errors_are_clear():
    with pytest.raises(DatasetError, match="all 3 are outliers"):
        MultipleGallerySampler([-1, -1, -1], [0, 0, 0], 4, 4)
    with pytest.raises(DatasetError, match="fewer than one batch of 64"):
        MultipleGallerySampler(LABELS, CAMS, 4, 64, num_iters=2)
    with pytest.raises(ConfigError, match="divisible by the world size"):
        MultipleGallerySampler(LABELS, CAMS, 4, 6, world_size=4)
    with pytest.raises(ConfigError, match="camera slot"):
        camera_slot(CAMS, "cams")


def test_reference_pass_statistics_cover_every_label():
    s = MultipleGallerySampler(LABELS, CAMS, 4, 4)
    items = s.pass_items(ReleasedDraws.from_seed(9))
    per_label = Counter(LABELS[i] for i in items)
    assert per_label == {0: 4, 1: 4, 2: 4, 3: 1, 4: 4, 5: 4}
