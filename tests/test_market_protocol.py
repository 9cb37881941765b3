"""The Market-1501 protocol against the released evaluator's golden case (eval_market.npz):
whole-descriptor L2 normalisation, squared Euclidean distances, same-identity same-camera
removal, CMC to rank 50 and mAP over the valid queries."""
import os

import numpy as np
import pytest

from evaluation.distance import compute_distance
from evaluation.metrics import evaluate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "fusionreid", "eval_market.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


def test_golden_arrays_are_consistent(golden):
    nq = int(golden["num_query"])
    assert nq == 40 and golden["feats"].shape == (235, 32)
    np.testing.assert_array_equal(golden["q_pids"], golden["pids"][:nq])
    np.testing.assert_array_equal(golden["g_pids"], golden["pids"][nq:])
    np.testing.assert_array_equal(golden["q_camids"], golden["camids"][:nq])
    np.testing.assert_array_equal(golden["g_camids"], golden["camids"][nq:])
    assert (golden["g_pids"] == 0).sum() == 25  # distractors, kept as negatives


def test_distance_from_features(golden):
    nq = int(golden["num_query"])
    feats = golden["feats"]
    d = compute_distance(feats[:nq], feats[nq:], metric="euclidean", normalize=True, squared=True).numpy()
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, golden["distmat"], rtol=0, atol=2e-6)
    # By hand in float64: whole-vector L2 normalisation, then |q - g|^2.
    f = feats.astype(np.float64) / np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True)
    ref = ((f[:nq, None, :] - f[None, nq:, :]) ** 2).sum(-1)
    np.testing.assert_allclose(golden["distmat"], ref, rtol=0, atol=2e-6)


def test_market_protocol_cmc_and_map(golden):
    r = evaluate(golden["distmat"], golden["q_pids"], golden["g_pids"], golden["q_camids"], golden["g_camids"],
                 protocol="market", max_rank=50)
    assert r["num_valid_queries"] == int(golden["num_valid_q"]) == 38 and r["num_queries"] == 40
    assert len(r["cmc"]) == 50
    np.testing.assert_allclose(r["cmc"], golden["cmc"].astype(np.float64), rtol=0, atol=1e-7)
    assert r["mAP"] == pytest.approx(float(golden["mAP"]), rel=1e-12, abs=0)
    assert np.array_equal(r["cmc"], r["cmc_standard"])
    # The two invalid queries only have same-camera matches in the gallery.
    same = golden["q_pids"][:, None] == golden["g_pids"][None, :]
    other_cam = golden["q_camids"][:, None] != golden["g_camids"][None, :]
    assert int((same & other_cam).any(1).sum()) == 38 and int(same.any(1).sum()) == 40


def test_market_protocol_from_features(golden):
    nq = int(golden["num_query"])
    d = compute_distance(golden["feats"][:nq], golden["feats"][nq:], metric="euclidean", normalize=True, squared=True)
    r = evaluate(d, golden["q_pids"], golden["g_pids"], golden["q_camids"], golden["g_camids"], protocol="market",
                 max_rank=50)
    np.testing.assert_allclose(r["cmc"], golden["cmc"].astype(np.float64), rtol=0, atol=1e-7)
    assert r["mAP"] == pytest.approx(float(golden["mAP"]), rel=1e-6)
