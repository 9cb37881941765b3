"""IV-REID evaluation: the released R1_mAP figures (tests/golden/ivreid/eval_metrics.pt) through
evaluation.metrics.evaluate, and the camera-major seeded SYSU galleries and trial seeds
against a plain loop over the folders."""
import os
import random

import numpy as np
import pytest
import torch

from data import build_test_split
from evaluation.distance import compute_distance
from evaluation.metrics import evaluate
from utils.config import ConfigError, build_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ivreid", "eval_metrics.pt")


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("case", ["sysu", "regdb"])
def test_released_cmc_and_map(golden, case):
    inputs, released = golden["inputs"][case], golden["outputs_eval"][case]
    n = inputs["num_query"]
    feats, pids, camids = inputs["feats"], inputs["pids"], inputs["camids"]
    # the released distance: squared Euclidean between the L2-normalised features
    distmat = compute_distance(feats[:n], feats[n:], "euclidean", normalize=True, squared=True)
    assert torch.allclose(distmat, released["distmat"], atol=1e-6)
    result = evaluate(distmat, pids[:n], pids[n:], camids[:n], camids[n:], protocol=case, max_rank=20)
    assert np.abs(result["cmc"] - released["cmc"].double().numpy()).max() < 1e-6
    assert abs(result["mAP"] - released["mAP"]) < 1e-9


@pytest.fixture
def keep_random_state():
    state = random.getstate()
    yield
    random.setstate(state)


def _cfg(root, *opts):
    return build_config("sysu", opts=["DATASET.ROOT", root, *opts])


def _test_ids(root):
    with open(os.path.join(root, "exp", "test_id.txt")) as f:
        return sorted(int(x) for x in f.read().splitlines()[0].split(","))


def _files(root, cam, pid):
    folder = os.path.join(root, "cam%d" % cam, "%04d" % pid)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)) if os.path.isdir(folder) else []


def _released_cam_major_gallery(root, cams, seed, shots):
    """The released IV-REID gallery walk (camera-major, then ids), on sorted listings."""
    random.seed(seed)
    chosen = []
    for cam in cams:
        for pid in _test_ids(root):
            files = _files(root, cam, pid)
            if files:
                chosen += [random.choice(files)] if shots == 1 else random.sample(files, min(shots, len(files)))
    return chosen


def _id_major_gallery(root, cams, seed):
    random.seed(seed)
    return [random.choice(_files(root, cam, pid)) for pid in _test_ids(root) for cam in cams if _files(root, cam, pid)]


@pytest.mark.parametrize("mode, cams, shots", [("all", (1, 2, 4, 5), 1), ("indoor", (1, 2), 1),
                                               ("all", (1, 2, 4, 5), 10)])
def test_seeded_cam_major_galleries(synthetic_root, keep_random_state, mode, cams, shots):
    root = synthetic_root("sysu")
    seeds = [2019, 2052, 2085]
    split = build_test_split(_cfg(root, "TEST.GALLERY", "seeded_cam_major", "TEST.MODE", mode, "TEST.SHOTS", str(shots),
                                  "TEST.TRIAL_SEEDS", str(seeds), "TEST.NUM_TRIALS", "3"))
    assert split.info["trials"] == seeds and split.info["gallery"] == "seeded_cam_major"
    galleries = [[split.gallery.paths[i] for i in trial] for trial in split.trials]
    for seed, gallery in zip(seeds, galleries):
        assert gallery == _released_cam_major_gallery(root, cams, seed, shots)
    assert galleries[0] != galleries[1]
    # the walk order decides which file each draw picks, not only the order of the picks
    assert sorted(galleries[0]) != sorted(_id_major_gallery(root, cams, seeds[0]))


def test_trial_seeds_apply_to_the_seeded_gallery(synthetic_root, keep_random_state):
    root = synthetic_root("sysu")
    split = build_test_split(_cfg(root, "TEST.TRIAL_SEEDS", "[7, 3]", "TEST.NUM_TRIALS", "2"))
    assert split.info["trials"] == [7, 3]
    for seed, trial in zip([7, 3], split.trials):
        assert [split.gallery.paths[i] for i in trial] == _id_major_gallery(root, (1, 2, 4, 5), seed)


@pytest.mark.parametrize("opts, message", [
    (["TEST.TRIAL_SEEDS", "[7, 3]"], "lists 2 seeds but TEST.NUM_TRIALS is 10"),
    (["TEST.TRIAL_SEEDS", "[7]", "TEST.NUM_TRIALS", "1", "TEST.GALLERY", "official"], "TEST.GALLERY official"),
])
def test_trial_seeds_that_cannot_apply_are_refused(synthetic_root, opts, message):
    with pytest.raises(ConfigError, match=message):
        build_test_split(_cfg(synthetic_root("sysu"), *opts))
