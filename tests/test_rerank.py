"""evaluation/rerank.py against a direct per-item loop implementation of the same algorithm.

The loop version below follows the steps of the evaluation.rerank docstring literally: a dense
normalised joint matrix, Python sets for the reciprocal neighbourhoods and the expansion,
dense weight rows and the Jaccard sums over the whole pool.
"""
import numpy as np
import pytest
import torch

from evaluation.trials import evaluate_trials
from evaluation.metrics import evaluate
from evaluation.rerank import k_reciprocal_rerank


def loop_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, expansion="released"):
    q_g, q_q, g_g = (np.asarray(x, dtype=np.float64) for x in (q_g, q_q, g_g))
    nq = q_g.shape[0]
    d = np.block([[q_q, q_g], [q_g.T, g_g]])
    n = d.shape[0]
    d = d - d.min()
    span = d.max(1)
    d = d / np.where(span > 0, span, 1)[:, None]
    k1, k2 = min(k1, n - 1), min(k2, n)
    ranked = np.argsort(d, axis=1, kind="stable")

    def neighbours(p, k):
        return list(ranked[p, :k + 1])

    def reciprocal(p, k):
        return {g for g in neighbours(p, k) if p in neighbours(g, k)}

    kh = int(round(k1 / 2))
    V = np.zeros((n, n))
    for p in range(n):
        base = reciprocal(p, k1)
        expanded = set(base)
        for g in base:
            half = reciprocal(g, kh)
            shared = len(half & base)
            if (3 * shared >= 2 * len(half)) if expansion == "paper" else (shared > 2.0 / 3 * len(half)):
                expanded |= half
        idx = sorted(expanded)
        w = np.exp(-d[p, idx])
        V[p, idx] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[ranked[p, :k2]].mean(0) for p in range(n)])
    jaccard = np.zeros((nq, n - nq))
    for p in range(nq):
        for g in range(nq, n):
            jaccard[p, g - nq] = 1 - np.minimum(V[p], V[g]).sum() / np.maximum(V[p], V[g]).sum()
    return (1 - lambda_value) * jaccard + lambda_value * d[:nq, nq:]


def clustered_features(seed, nq, ng, ids=6, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    q_pids, g_pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    q = centres[q_pids] + 0.7 * rng.standard_normal((nq, dim))
    g = centres[g_pids] + 0.7 * rng.standard_normal((ng, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return q, g, q_pids, g_pids


@pytest.mark.parametrize("expansion", ["released", "paper"])
@pytest.mark.parametrize("seed,k1,k2,lam", [(0, 20, 6, 0.3), (1, 5, 1, 0.0), (2, 7, 3, 1.0), (3, 4, 2, 0.5)])
def test_matches_loop_implementation(seed, k1, k2, lam, expansion):
    q, g, _, _ = clustered_features(seed, 9, 26)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    expected = loop_rerank(q_g, q_q, g_g, k1, k2, lam, expansion=expansion)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam, expansion=expansion)
    assert got.dtype == torch.float32 and got.shape == (9, 26)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5)


def test_released_expansion_rule():
    q, g, _, _ = clustered_features(9, 10, 30)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    paper = k_reciprocal_rerank(q_g, q_q, g_g, k1=6, k2=3, expansion="paper")
    released = k_reciprocal_rerank(q_g, q_q, g_g, k1=6, k2=3, expansion="released")
    np.testing.assert_allclose(released.numpy(), loop_rerank(q_g, q_q, g_g, 6, 3, expansion="released"), atol=2e-5)
    np.testing.assert_allclose(paper.numpy(), loop_rerank(q_g, q_q, g_g, 6, 3, expansion="paper"), atol=2e-5)
    assert not np.allclose(paper.numpy(), released.numpy(), atol=1e-4)
    # the default is the released rule
    np.testing.assert_array_equal(k_reciprocal_rerank(q_g, q_q, g_g, k1=6, k2=3).numpy(), released.numpy())


def test_evaluate_trials_dict_without_expansion_uses_released_rule():
    """A re-rank dict that names no expansion rule re-ranks with the released one."""
    q, g, q_pids, g_pids = clustered_features(9, 10, 30)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    trials = [np.arange(30)]
    figures = {}
    for expansion in ("released", "paper"):
        d = loop_rerank(q_g, q_q, g_g, 6, 3, 0.3, expansion=expansion)
        figures[expansion] = evaluate(d, q_pids, g_pids, None, None, "regdb", max_rank=10)
    # the two rules give different figures on this problem, so the check below can tell them apart
    assert figures["released"]["mAP"] != pytest.approx(figures["paper"]["mAP"], abs=1e-6)
    got = evaluate_trials(q_g, q_pids, g_pids, None, None, trials, "regdb", max_rank=10,
                          rerank=dict(q_q=q_q, g_g=g_g, k1=6, k2=3, lambda_value=0.3))
    assert got["per_trial"][0]["mAP"] == pytest.approx(figures["released"]["mAP"], abs=1e-6)
    np.testing.assert_allclose(got["per_trial"][0]["cmc"], figures["released"]["cmc"], atol=1e-6)


def test_float64_rerank_matches_loop_reference_closely():
    q, g, _, _ = clustered_features(10, 9, 26)
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    q_g, q_q, g_g = sq(q, g), sq(q, q), sq(g, g)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=7, k2=3, dtype=torch.float64)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), loop_rerank(q_g, q_q, g_g, 7, 3), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="dtype"):
        k_reciprocal_rerank(q_g, q_q, g_g, dtype=torch.float16)


def test_small_memory_budget_gives_same_result():
    q, g, _, _ = clustered_features(4, 12, 30)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    full = k_reciprocal_rerank(q_g, q_q, g_g, k1=6, k2=3)
    # A budget of a few hundred bytes forces one row per block and many Jaccard blocks.
    tiny = k_reciprocal_rerank(torch.from_numpy(q_g), q_q, g_g, k1=6, k2=3, memory_mb=1e-4)
    np.testing.assert_allclose(tiny.numpy(), full.numpy(), atol=1e-6)


def test_cosine_equals_squared_euclidean_on_normalised_features():
    q, g, _, _ = clustered_features(5, 8, 20)
    cos = k_reciprocal_rerank(-(q @ g.T), -(q @ q.T), -(g @ g.T), k1=5, k2=2)
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    euc = k_reciprocal_rerank(sq(q, g), sq(q, q), sq(g, g), k1=5, k2=2)
    np.testing.assert_allclose(cos.numpy(), euc.numpy(), atol=1e-5)


def test_k_larger_than_pool_is_clamped():
    q, g, _, _ = clustered_features(6, 3, 5)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=20, k2=30)
    np.testing.assert_allclose(got.numpy(), loop_rerank(q_g, q_q, g_g, 20, 30), atol=2e-5)


def test_bad_inputs():
    q, g, _, _ = clustered_features(7, 4, 6)
    with pytest.raises(ValueError, match="g_g must have shape"):
        k_reciprocal_rerank(-(q @ g.T), -(q @ q.T), -(g @ g.T)[:5])
    bad = -(q @ g.T)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank(bad, -(q @ q.T), -(g @ g.T))
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(-(q @ g.T), -(q @ q.T), -(g @ g.T), lambda_value=2)


def test_evaluate_trials_reranks_each_trial_on_its_columns():
    q, g, q_pids, g_pids = clustered_features(8, 10, 40)
    q_cams, g_cams = np.ones(10, np.int64), np.full(40, 2)
    q_g, q_q, g_g = -(q @ g.T), -(q @ q.T), -(g @ g.T)
    trials = [np.arange(0, 40, 2), np.arange(1, 40, 2)]
    params = dict(k1=5, k2=2, lambda_value=0.3)
    result = evaluate_trials(q_g, q_pids, g_pids, q_cams, g_cams, trials, "regdb", max_rank=5,
                             rerank=dict(q_q=q_q, g_g=g_g, **params))
    assert result["reranked"]
    for cols, rec in zip(trials, result["per_trial"]):
        d = k_reciprocal_rerank(q_g[:, cols], q_q, g_g[np.ix_(cols, cols)], **params)
        ref = evaluate(d, q_pids, g_pids[cols], q_cams, g_cams[cols], "regdb", max_rank=5)
        assert rec["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
        assert rec["cmc"] == pytest.approx(list(ref["cmc"]), abs=1e-12)
    # A callable receives the trial's columns of the distance matrix and their indices.
    seen = []
    evaluate_trials(q_g, q_pids, g_pids, q_cams, g_cams, trials, "regdb", max_rank=5,
                    rerank=lambda d, cols: seen.append((tuple(d.shape), cols.tolist())) or d)
    assert seen == [((10, 20), trials[0].tolist()), ((10, 20), trials[1].tolist())]
    with pytest.raises(ValueError, match="rerank dict"):
        evaluate_trials(q_g, q_pids, g_pids, q_cams, g_cams, trials, "regdb", rerank=dict(q_q=q_q))
