"""cluster.dbscan, cluster.pseudo_labels and cluster.camera.

Expectations: the golden DBSCAN labels, counts and silhouettes of the reference clustering
code (tests/golden/cmag/jaccard_*.pt), and sklearn's DBSCAN / silhouette on dense matrices
(tests/reference_jaccard.py) for radius-graph edge cases: explicit zero distances, values
exactly at eps, eps at or above the distance of the unstored pairs, a diagonal beyond eps.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score
from yacs.config import CfgNode

from cluster.camera import CameraLocalSelection, camera_eps, silhouette
from utils.errors import ConfigError
from cluster.dbscan import cluster_counts, dbscan_labels
from cluster.jaccard import SparseJaccard, jaccard_distance
from cluster.pseudo_labels import PseudoLabeller
from reference_jaccard import reference_dbscan, reference_jaccard

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
CASES = ("jaccard_tiny", "jaccard_sysu_like", "jaccard_regdb_like")


@pytest.fixture(scope="module", params=CASES)
def golden(request):
    case = torch.load(os.path.join(GOLDEN, request.param + ".pt"), weights_only=True)
    p = case["params"]
    case["sparse"] = jaccard_distance(case["inputs"]["features"], p["k1"], p["k2"])
    return case


def sparse_from_dense(dense):
    """SparseJaccard storing every entry below 1 and the diagonal, as jaccard_distance stores them."""
    dense = torch.as_tensor(dense, dtype=torch.float32)
    n = dense.shape[0]
    stored = (dense < 1) | torch.eye(n, dtype=torch.bool)
    counts = stored.sum(1)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    rows, cols = torch.nonzero(stored, as_tuple=True)
    return SparseJaccard(indptr, cols, dense[rows, cols], n)


def test_golden_labels_and_counts(golden):
    for key, rec in golden["outputs"]["dbscan"].items():
        labels = dbscan_labels(golden["sparse"], rec["eps"], rec["min_samples"])
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, rec["labels"].numpy(), err_msg="eps %s" % key)
        assert cluster_counts(labels) == (rec["num_clusters"], rec["num_outliers"])


def test_golden_through_the_pseudo_labeller(golden):
    p = golden["params"]
    for rec in golden["outputs"]["dbscan"].values():
        out = PseudoLabeller(rec["eps"], k1=p["k1"], k2=p["k2"])(golden["inputs"]["features"])
        np.testing.assert_array_equal(out.labels, rec["labels"].numpy())
        assert (out.num_clusters, out.num_outliers) == (rec["num_clusters"], rec["num_outliers"])
        assert out.jaccard is None


def test_golden_silhouette(golden):
    for rec in golden["outputs"]["dbscan"].values():
        got = silhouette(golden["sparse"], rec["labels"].numpy())
        assert got == pytest.approx(rec["silhouette_precomputed"], abs=1e-5)


def test_pseudo_labeller_from_config_and_kept_distances(golden):
    cfg = CfgNode({"USL": {"CLUSTER": {"EPS": 0.6, "K1": golden["params"]["k1"], "K2": golden["params"]["k2"],
                                       "MIN_SAMPLES": 4, "KNN_BACKEND": "torch", "MEMORY_MB": 64}}})
    rec = golden["outputs"]["dbscan"]
    first = sorted(rec)[0]
    out = PseudoLabeller.from_config(cfg, eps=rec[first]["eps"], keep_distances=True)(golden["inputs"]["features"])
    np.testing.assert_array_equal(out.labels, rec[first]["labels"].numpy())
    assert out.jaccard.max_distance is None
    torch.testing.assert_close(out.jaccard.to_dense(), golden["outputs"]["jaccard"], rtol=0, atol=1e-5)


def random_distances(seed, n, ties_at=None):
    """A Jaccard-like matrix: values in [0, 1), many pairs at exactly 1, a few exact zeros."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0, 1, (n, n)).astype(np.float32)
    d[rng.uniform(size=(n, n)) < 0.5] = 1.0
    d[rng.uniform(size=(n, n)) < 0.03] = 0.0
    if ties_at is not None:
        d[rng.uniform(size=(n, n)) < 0.1] = np.float32(ties_at)
    np.fill_diagonal(d, 1e-7)
    return d


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("min_samples", [1, 4, 9])
def test_sparse_graph_equals_dense_dbscan(eps, min_samples):
    for seed in range(3):
        d = random_distances(seed, 60, ties_at=eps)
        expected = reference_dbscan(d, eps, min_samples)
        np.testing.assert_array_equal(dbscan_labels(sparse_from_dense(d), eps, min_samples), expected)


@pytest.mark.parametrize("eps", [1.0, 1.5, 0.99999999])
def test_eps_reaching_the_unstored_distance(eps):
    d = random_distances(4, 30)
    sparse = sparse_from_dense(d)
    for min_samples in (4, 30, 31):
        expected = reference_dbscan(d, eps, min_samples)
        np.testing.assert_array_equal(dbscan_labels(sparse, eps, min_samples), expected)


def test_diagonal_beyond_eps_is_not_a_neighbour():
    d = random_distances(5, 40)
    np.fill_diagonal(d, 2e-7)
    eps = 1e-7
    for min_samples in (1, 2, 3):
        np.testing.assert_array_equal(dbscan_labels(sparse_from_dense(d), eps, min_samples),
                                      reference_dbscan(d, eps, min_samples))


def test_duplicate_images_give_zero_distances():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(6, 16, generator=g)
    x = centres[torch.randint(0, 6, (40,), generator=g)] + 0.5 * torch.randn(40, 16, generator=g)
    x = F.normalize(torch.cat([x, x[:12]]), dim=1)
    expected = reference_jaccard(x.numpy(), 8, 3)
    assert (expected[np.triu_indices(52, 1)] == 0).any()
    sparse = jaccard_distance(x, 8, 3)
    for eps in (0.2, 0.5):
        np.testing.assert_array_equal(dbscan_labels(sparse, eps), reference_dbscan(expected, eps))


def test_bad_arguments():
    sparse = sparse_from_dense(random_distances(7, 10))
    with pytest.raises(ValueError, match="eps"):
        dbscan_labels(sparse, 0)
    with pytest.raises(ValueError, match="min_samples"):
        dbscan_labels(sparse, 0.5, 0)
    with pytest.raises(ValueError, match="eps"):
        PseudoLabeller(-1)


def test_silhouette_matches_sklearn_and_is_undefined_for_one_label():
    d = random_distances(8, 50)
    np.fill_diagonal(d, 0)
    d = np.minimum(d, d.T)
    labels = np.random.default_rng(8).integers(-1, 4, 50)
    assert silhouette(sparse_from_dense(d), labels) == pytest.approx(
        silhouette_score(d, labels, metric="precomputed"), abs=1e-6)
    assert silhouette(sparse_from_dense(d), np.zeros(50, dtype=np.int64)) is None
    assert silhouette(sparse_from_dense(d), np.arange(50)) is None
    with pytest.raises(ValueError, match="one entry per image"):
        silhouette(sparse_from_dense(d), labels[:10])


def test_camera_local_selection_keeps_the_best_epoch_from_10(tmp_path, golden):
    sparse = golden["sparse"]
    by_eps = golden["outputs"]["dbscan"]
    ranked = sorted(by_eps.values(), key=lambda r: r["silhouette_precomputed"])
    low, high = ranked[0], ranked[-1]
    sel = CameraLocalSelection()
    # before epoch 10 nothing is scored, even the best clustering
    assert not sel.update(9, sparse, high["labels"].numpy())
    assert sel.best_epoch is None and sel.labels is None
    assert sel.update(10, sparse, low["labels"].numpy())
    assert sel.best_score == pytest.approx(low["silhouette_precomputed"], abs=1e-5)
    assert sel.update(12, sparse, high["labels"].numpy())
    assert not sel.update(13, sparse, low["labels"].numpy())
    # an equal score does not replace the kept clustering
    assert not sel.update(14, sparse, high["labels"].numpy())
    assert sel.best_epoch == 12
    np.testing.assert_array_equal(sel.labels, high["labels"].numpy())
    torch.save(sel.state_dict(), tmp_path / "sel.pt")
    again = CameraLocalSelection(first_epoch=0)
    again.load_state_dict(torch.load(tmp_path / "sel.pt", weights_only=True))
    assert (again.first_epoch, again.best_epoch, again.best_score) == (10, 12, sel.best_score)
    np.testing.assert_array_equal(again.labels, sel.labels)
    assert again.labels.dtype == np.int64


def test_a_non_positive_silhouette_is_never_kept():
    d = random_distances(9, 40)
    np.fill_diagonal(d, 0)
    labels = np.random.default_rng(9).integers(0, 3, 40)
    score = silhouette(sparse_from_dense(d), labels)
    assert score < 0
    sel = CameraLocalSelection()
    assert not sel.update(20, sparse_from_dense(d), labels)


def test_camera_settings_from_config():
    cfg = CfgNode({"USL": {"CAMERA": {"EPS": [0.2, 0.2, 0.6, 0.5, 0.5, 0.2], "FIRST_EPOCH": 3}}})
    assert [camera_eps(cfg, c) for c in (2, 5, 3)] == [0.6, 0.2, 0.5]
    with pytest.raises(ConfigError, match="USL.CAMERA.EPS has 6 entries"):
        camera_eps(cfg, 6)
    sel = CameraLocalSelection.from_config(cfg)
    assert sel.first_epoch == 3
