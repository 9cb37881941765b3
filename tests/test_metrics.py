"""evaluation/metrics.py, evaluation/distance.py and evaluation/trials.py.

Expectations come from the golden outputs of the released eval_metrics.py
(tests/golden/eval_metrics.npz), from the per-query loop reference tests/reference_eval.py,
and from hand-computed cases (a SYSU query whose ranked gallery is worked out by hand, with
and without the cam-2 removal).
"""
import json
import os

import numpy as np
import pytest
import torch

from reference_eval import reference_evaluate
from evaluation.distance import compute_distance
from evaluation.trials import evaluate_trials, format_table
from evaluation import metrics
from evaluation.metrics import evaluate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "eval_metrics.npz")


def assert_same(got, ref, max_rank=20):
    np.testing.assert_allclose(got["cmc"][:max_rank], ref["cmc"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["cmc_standard"][:max_rank], ref["cmc_standard"], rtol=0, atol=1e-6)
    assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert got["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)
    assert got["num_valid_queries"] == ref["num_valid_queries"]


def random_problem(seed, protocol, n_ids=30, n_query=70, ties=False):
    """Gallery: every identity in every gallery camera (1-2 images), so every query keeps more
    than 20 distinct identities and the reference's distinct CMC is well defined. A few query
    identities are absent from the gallery (invalid queries)."""
    rng = np.random.default_rng(seed)
    g_cam_set, q_cam_set = {"sysu": ([1, 2, 4, 5], [3, 6]), "llcm": ([1, 2, 3, 4], [1, 2, 3, 4]),
                            "regdb": ([2], [1]), "market": ([1, 2, 3], [1, 2, 3])}[protocol]
    g_pids, g_cams = [], []
    for pid in range(n_ids):
        for cam in g_cam_set:
            k = rng.integers(1, 3)
            g_pids += [pid] * k
            g_cams += [cam] * k
    g_pids, g_cams = np.array(g_pids), np.array(g_cams)
    q_pids = rng.integers(0, n_ids + 3, n_query)
    q_cams = rng.choice(q_cam_set, n_query)
    centres = rng.standard_normal((n_ids + 3, 16))
    q = centres[q_pids] + 1.2 * rng.standard_normal((n_query, 16))
    g = centres[g_pids] + 1.2 * rng.standard_normal((len(g_pids), 16))
    dist = -(q @ g.T)
    if ties:
        dist = np.round(dist, 0)
    return dist, q_pids, g_pids, q_cams, g_cams


# ---------------------------------------------------------------------------- golden file


@pytest.mark.parametrize("problem", ["sysu", "llcm", "regdb"])
def test_golden_released_eval_metrics(problem):
    data = np.load(GOLDEN, allow_pickle=False)
    args = [data["%s_%s" % (problem, k)] for k in ("distmat", "q_pids", "g_pids", "q_camids", "g_camids")]
    got = evaluate(*args, protocol=problem)
    np.testing.assert_allclose(got["cmc"], data[problem + "_cmc"], rtol=0, atol=1e-6)
    assert got["mAP"] == pytest.approx(float(data[problem + "_mAP"]), abs=1e-6)
    assert got["mINP"] == pytest.approx(float(data[problem + "_mINP"]), abs=1e-6)
    assert got["num_valid_queries"] == int(data[problem + "_num_valid_q"])
    # The loop reference reproduces the released code exactly as well.
    ref = reference_evaluate(*args, protocol=problem)
    np.testing.assert_array_equal(ref["cmc"], data[problem + "_cmc"])
    assert ref["mAP"] == float(data[problem + "_mAP"]) and ref["mINP"] == float(data[problem + "_mINP"])


# ------------------------------------------------------------------- loop reference


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb", "market"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(protocol, seed):
    args = random_problem(seed, protocol)
    ref = reference_evaluate(*args, protocol=protocol)
    assert 0 < ref["num_valid_queries"] < len(args[1])
    for chunk_rows in (None, 1, 16):
        assert_same(evaluate(*args, protocol=protocol, chunk_rows=chunk_rows), ref)


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb", "market"])
def test_ties_are_broken_by_gallery_index(protocol):
    # Rounded distances: many exact ties between true matches and other items.
    args = random_problem(10 + len(protocol), protocol, ties=True)
    ref = reference_evaluate(*args, protocol=protocol, sort_kind="stable")
    assert_same(evaluate(*args, protocol=protocol, chunk_rows=7), ref)


def test_ties_hand_made():
    # Gallery pids [7, 3, 7, 3] all at the same distance: ranked by index -> 7, 3, 7, 3.
    got = evaluate(np.zeros((1, 4)), [3], [7, 3, 7, 3], [1], [2, 2, 2, 2], "regdb", max_rank=4)
    np.testing.assert_array_equal(got["cmc"], [0, 1, 1, 1])
    assert got["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert got["mINP"] == pytest.approx(2 / 4)


def test_ties_at_the_first_match_and_with_removed_items():
    # regdb: pids [7, 8, 3, 9, 3] at distances [0, 1, 1, 1, 2]: ranked 7, 8, 3, 9, 3.
    got = evaluate(np.array([[0.0, 1, 1, 1, 2]]), [3], [7, 8, 3, 9, 3], [1], [2] * 5, "regdb", max_rank=5)
    np.testing.assert_array_equal(got["cmc_standard"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(got["cmc_distinct"], [0, 0, 1, 1, 1])
    assert got["mAP"] == pytest.approx((1 / 3 + 2 / 5) / 2) and got["mINP"] == pytest.approx(2 / 5)
    # llcm: the same-camera 3 (removed) ties with a kept 3 and a 5, all at distance 1; the
    # kept list is 6, 5, 3: rank 3, distinct rank 3.
    got = evaluate(np.array([[0.0, 1, 1, 1]]), [3], [6, 3, 5, 3], [1], [4, 1, 4, 2], "llcm", max_rank=4)
    np.testing.assert_array_equal(got["cmc_standard"], [0, 0, 1, 1])
    np.testing.assert_array_equal(got["cmc"], [0, 0, 1, 1])
    assert got["mAP"] == pytest.approx(1 / 3) and got["mINP"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb", "market"])
def test_torch_path_small_blocks_and_budget(monkeypatch, protocol):
    """The torch code path (the one that runs on GPUs), and the CPU path with sort blocks of
    one or two rows and a memory budget that reads one row at a time."""
    import evaluation.metrics as metrics

    for seed, ties in ((30, False), (31, True)):
        args = random_problem(seed, protocol, ties=ties)
        ref = reference_evaluate(*args, protocol=protocol, sort_kind="stable")
        with monkeypatch.context() as m:
            m.setattr(metrics, "NUMPY_ON_CPU", False)
            assert_same(evaluate(*args, protocol=protocol), ref)
            assert_same(evaluate(torch.from_numpy(args[0]).float(), *args[1:], protocol=protocol),
                        reference_evaluate(args[0].astype(np.float32), *args[1:], protocol=protocol,
                                           sort_kind="stable"))
        with monkeypatch.context() as m:
            m.setattr(metrics, "_BLOCK_BITS", 9)
            assert_same(evaluate(*args, protocol=protocol, memory_mb=1e-4), ref)


@pytest.mark.parametrize("protocol", ["sysu", "llcm"])
def test_long_rows(monkeypatch, protocol):
    # Over 1024 gallery items: each row's sort cap is raised to a sampled percentile.
    import evaluation.metrics as metrics

    for ties in (False, True):
        args = random_problem(40 + ties, protocol, n_ids=260, n_query=50, ties=ties)
        assert args[0].shape[1] >= 1024
        ref = reference_evaluate(*args, protocol=protocol, sort_kind="stable")
        assert_same(evaluate(*args, protocol=protocol), ref)
        with monkeypatch.context() as m:
            m.setattr(metrics, "NUMPY_ON_CPU", False)
            assert_same(evaluate(*args, protocol=protocol), ref)


def test_every_match_ranked_last():
    # The worst case for the distinct-identity rank: every other item comes first.
    rng = np.random.default_rng(3)
    g_pids, q_pids = rng.integers(0, 25, 300), rng.integers(0, 25, 40)
    dist = rng.random((40, 300)) + 2.0 * (q_pids[:, None] == g_pids[None, :])
    ones, twos = np.ones(40, np.int64), np.full(300, 2)
    ref = reference_evaluate(dist, q_pids, g_pids, ones, twos, "regdb")
    got = evaluate(dist, q_pids, g_pids, ones, twos, "regdb", memory_mb=0.05, return_per_query=True)
    assert_same(got, ref)
    counts = np.bincount(g_pids, minlength=25)[q_pids]
    np.testing.assert_array_equal(got["per_query"]["rank"], 300 - counts + 1)
    np.testing.assert_array_equal(got["per_query"]["rank_distinct"], 25)


def test_infinite_distances_and_wide_ranges():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(20, "market")
    dist = dist * 1e6
    rng = np.random.default_rng(0)
    dist[rng.random(dist.shape) < 0.05] = np.inf
    dist[rng.random(dist.shape) < 0.02] = -np.inf
    # spans that overflow (max - (-max) = inf)
    dist[rng.random(dist.shape) < 0.02] = np.finfo(np.float64).max
    dist[rng.random(dist.shape) < 0.02] = -np.finfo(np.float64).max
    ref = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, "market", sort_kind="stable")
    assert_same(evaluate(dist, q_pids, g_pids, q_cams, g_cams, "market", chunk_rows=5), ref)


def test_torch_inputs_float32_and_half():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(3, "llcm")
    d32 = dist.astype(np.float32)
    ref = reference_evaluate(d32, q_pids, g_pids, q_cams, g_cams, "llcm")
    labels = [torch.from_numpy(x) for x in (q_pids, g_pids, q_cams, g_cams)]
    assert_same(evaluate(torch.from_numpy(d32), *labels, protocol="llcm"), ref)
    half = torch.from_numpy(dist).half()
    ref = reference_evaluate(half.float().numpy(), q_pids, g_pids, q_cams, g_cams, "llcm", sort_kind="stable")
    assert_same(evaluate(half, *labels, protocol="llcm"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(4, "sysu")
    ref = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, "sysu")
    labels = [torch.from_numpy(x).cuda() for x in (q_pids, g_pids, q_cams, g_cams)]
    assert_same(evaluate(torch.from_numpy(dist).cuda(), *labels, protocol="sysu", chunk_rows=9), ref)


def test_per_query_values():
    args = random_problem(5, "sysu")
    got = evaluate(*args, protocol="sysu", return_per_query=True)
    pq = got["per_query"]
    assert pq["valid"].sum() == got["num_valid_queries"]
    assert pq["ap"][pq["valid"]].mean() == pytest.approx(got["mAP"], abs=1e-12)
    assert pq["inp"][pq["valid"]].mean() == pytest.approx(got["mINP"], abs=1e-12)
    assert (pq["rank_distinct"] <= pq["rank"]).all()
    assert (pq["rank"][~pq["valid"]] == 0).all()
    assert got["cmc"][0] == pytest.approx((pq["rank"][pq["valid"]] == 1).mean())


# ------------------------------------------------------------ hand-made protocol cases


def worked_example(query_cam):
    """A query with pid 3 ranks the gallery as pids [5, 5, 7, 3, 9, 3], the second 5 in cam 2
    (22 more identities follow so the reference keeps 20 distinct ids)."""
    g_pids = np.array([5, 5, 7, 3, 9, 3] + list(range(10, 32)))
    g_cams = np.array([1, 2, 4, 1, 5, 4] + [1] * 22)
    dist = np.arange(len(g_pids), dtype=np.float64)[None]
    return dist, np.array([3]), g_pids, np.array([query_cam]), g_cams


def test_worked_example_cam6():
    got = evaluate(*worked_example(6), protocol="sysu")
    assert list(got["cmc_standard"][:5]) == [0, 0, 0, 1, 1]
    assert list(got["cmc"][:5]) == [0, 0, 1, 1, 1]  # distinct-identity rank 3
    assert got["mAP"] == pytest.approx((1 / 4 + 2 / 6) / 2) and round(got["mAP"], 4) == 0.2917
    assert got["mINP"] == pytest.approx(2 / 6)
    assert_same(got, reference_evaluate(*worked_example(6), protocol="sysu"))


def test_worked_example_cam3_drops_every_cam2_item():
    got = evaluate(*worked_example(3), protocol="sysu")
    assert list(got["cmc_standard"][:4]) == [0, 0, 1, 1]
    assert list(got["cmc"][:4]) == [0, 0, 1, 1]
    assert got["mAP"] == pytest.approx((1 / 3 + 2 / 5) / 2) and round(got["mAP"], 4) == 0.3667
    assert got["mINP"] == pytest.approx(2 / 5)
    assert_same(got, reference_evaluate(*worked_example(3), protocol="sysu"))


def test_llcm_and_market_drop_same_pid_same_camera_only():
    g_pids = np.array([3, 5, 3, 3])
    g_cams = np.array([1, 1, 2, 1])
    dist = np.arange(4.0)[None]
    for protocol in ("llcm", "market"):
        got = evaluate(dist, [3], g_pids, [1], g_cams, protocol, max_rank=3)
        # kept list: [5 (cam1), 3 (cam2)] -> first hit at rank 2, AP = 1/2, INP = 1/2
        assert list(got["cmc"]) == [0, 1, 1] and got["mAP"] == 0.5 and got["mINP"] == 0.5
    got = evaluate(dist, [3], g_pids, [1], g_cams, "regdb", max_rank=3)
    assert list(got["cmc"]) == [1, 1, 1] and got["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # regdb ignores cameras, so they may be omitted
    assert evaluate(dist, [3], g_pids, protocol="regdb", max_rank=3)["mAP"] == got["mAP"]


def test_query_without_match_is_skipped_and_all_invalid_raises():
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    got = evaluate(dist, [1, 9], [1, 2, 1], [1, 1], [2, 2, 2], "regdb", max_rank=3)
    assert got["num_valid_queries"] == 1 and got["num_queries"] == 2
    assert list(got["cmc"]) == [1, 1, 1] and got["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate(dist, [8, 9], [1, 2, 1], [1, 1], [2, 2, 2], "regdb")
    # sysu: the only match is in cam 2 and the query is from cam 3
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate(dist[:1], [2], [1, 2, 1], [3], [1, 2, 4], "sysu")
    # sysu with an all-cam-2 gallery: cam-3 queries have nothing left, cam-6 ones do
    got = evaluate(dist, [1, 1], [1, 2, 1], [3, 6], [2, 2, 2], "sysu", max_rank=3, return_per_query=True)
    assert got["num_valid_queries"] == 1 and list(got["per_query"]["valid"]) == [False, True]
    assert list(got["cmc"]) == [1, 1, 1] and got["mAP"] == pytest.approx((1 + 2 / 3) / 2)  # ranked 1, 2, 1


def test_fewer_identities_or_images_than_max_rank_saturate():
    # 4 gallery identities, 8 images: the reference's CMC has 4 (distinct) or 8 (standard) values.
    rng = np.random.default_rng(1)
    g_pids = np.repeat(np.arange(4), 2)
    g_cams = np.tile([1, 4], 4)
    q_pids = rng.integers(0, 4, 12)
    dist = rng.random((12, 8))
    q_cams = np.full(12, 6)
    got = evaluate(dist, q_pids, g_pids, q_cams, g_cams, "sysu", max_rank=20)
    assert len(got["cmc"]) == 20 and len(got["cmc_standard"]) == 20
    ref = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, "sysu", max_rank=4)
    np.testing.assert_allclose(got["cmc"][:4], ref["cmc"], atol=1e-6)
    np.testing.assert_array_equal(got["cmc"][3:], 1.0)  # every id is found within 4 distinct ids
    ref = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, "regdb", max_rank=20)  # lowered to 8
    assert len(ref["cmc"]) == 8
    got = evaluate(dist, q_pids, g_pids, q_cams, g_cams, "regdb", max_rank=20)
    np.testing.assert_allclose(got["cmc"][:8], ref["cmc"], atol=1e-6)
    np.testing.assert_array_equal(got["cmc"][7:], 1.0)
    # The ragged case the reference cannot handle: cam-3 queries lose the cam-2-only identity.
    g_cams2 = np.where(g_pids == 0, 2, g_cams)
    q_cams2 = np.where(np.arange(12) % 2, 3, 6)
    got = evaluate(dist, q_pids, g_pids, q_cams2, g_cams2, "sysu", max_rank=5)
    valid = ~((q_pids == 0) & (q_cams2 == 3))
    assert got["num_valid_queries"] == valid.sum()
    assert got["cmc"][-1] == 1.0


def test_bad_inputs():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(d, [1, 2], [1, 2, 3], [1, 1], [2, 2, 2], "viper")
    with pytest.raises(ValueError, match="g_pids must be a 1-D array of length 3"):
        evaluate(d, [1, 2], [1, 2], [1, 1], [2, 2, 2], "regdb")
    with pytest.raises(ValueError, match="needs q_camids"):
        evaluate(d, [1, 2], [1, 2, 3], None, None, "sysu")
    with pytest.raises(ValueError, match="integers"):
        evaluate(d, [1.0, 2.0], [1, 2, 3], [1, 1], [2, 2, 2], "regdb")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(d, [1, 2], [1, 2, 3], [1, 1], [2, 2, 2], "regdb", max_rank=0)
    bad = d.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN \(query row 1\)"):
        evaluate(bad, [1, 2], [1, 2, 3], [1, 1], [2, 2, 2], "regdb")
    # sysu evaluates cam-3 queries apart (without cam 2): the row is still named right
    bad = np.zeros((3, 3))
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN \(query row 1\)"):
        evaluate(bad, [1, 2, 3], [1, 2, 3], [6, 3, 6], [1, 2, 4], "sysu")


# ----------------------------------------------------------------------------- trials


def test_evaluate_trials_mean_std_and_json():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(6, "sysu")
    rng = np.random.default_rng(0)
    trials = [np.sort(rng.choice(dist.shape[1], 90, replace=False)) for _ in range(3)]
    result = evaluate_trials(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, trials, "sysu")
    json.dumps(result)
    assert result["num_trials"] == 3 and result["max_rank"] == 20 and not result["reranked"]
    singles = [evaluate(dist[:, t], q_pids, g_pids[t], q_cams, g_cams[t], "sysu") for t in trials]
    for rec, single, cols in zip(result["per_trial"], singles, trials):
        assert rec["rank1"] == single["cmc"][0] and rec["rank20"] == single["cmc"][19]
        assert rec["mAP"] == single["mAP"] and rec["num_gallery"] == len(cols)
    maps = [s["mAP"] for s in singles]
    assert result["mean"]["mAP"] == pytest.approx(np.mean(maps), abs=1e-15)
    assert result["std"]["mAP"] == pytest.approx(np.sqrt(np.mean((np.array(maps) - np.mean(maps)) ** 2)), abs=1e-15)
    cmcs = np.array([s["cmc"] for s in singles])
    np.testing.assert_allclose(result["mean"]["cmc"], cmcs.mean(0), atol=1e-15)
    np.testing.assert_allclose(result["std"]["cmc"], cmcs.std(0), atol=1e-15)

    one = evaluate_trials(dist, q_pids, g_pids, q_cams, g_cams, None, "sysu", max_rank=5)
    assert one["num_trials"] == 1 and one["std"]["mAP"] == 0.0
    assert set(one["mean"]) == {"rank1", "rank5", "mAP", "mINP", "cmc"}
    with pytest.raises(ValueError, match="trial 0"):
        evaluate_trials(dist, q_pids, g_pids, q_cams, g_cams, [np.array([0, dist.shape[1]])], "sysu")


def test_format_table():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(7, "llcm")
    trials = [np.arange(0, dist.shape[1], 2), np.arange(1, dist.shape[1], 2)]
    result = evaluate_trials(dist, q_pids, g_pids, q_cams, g_cams, trials, "llcm")
    text = format_table(result, title="LLCM test", verbose=True)
    lines = text.splitlines()
    assert lines[0] == "LLCM test"
    assert lines[1].split() == ["Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP", "mINP"]
    assert lines[2].startswith("trial 0") and lines[3].startswith("trial 1")
    assert "%.2f" % (100 * result["per_trial"][1]["mAP"]) in lines[3]
    m, s = result["mean"]["mINP"], result["std"]["mINP"]
    assert lines[4].startswith("mean ± std") and lines[4].endswith("%.2f ± %.2f" % (100 * m, 100 * s))
    assert len(format_table(result).splitlines()) == 2  # no title, no per-trial rows
    single = evaluate_trials(dist, q_pids, g_pids, q_cams, g_cams, None, "llcm")
    assert "±" not in format_table(single)


# ---------------------------------------------------------------------------- distance


def test_compute_distance():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((7, 5)), rng.standard_normal((11, 5))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    euclid = np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))
    for block in (1, 3, 4096):
        cos = compute_distance(q, g, "cosine", block_size=block)
        assert cos.dtype == torch.float32 and cos.shape == (7, 11)
        np.testing.assert_allclose(cos.numpy(), -(q @ g.T), atol=1e-5)
        np.testing.assert_allclose(compute_distance(q, g, "euclidean", block_size=block).numpy(), euclid, atol=1e-5)
    np.testing.assert_allclose(compute_distance(q, g, normalize=True).numpy(), -(qn @ gn.T), atol=1e-5)
    np.testing.assert_allclose(compute_distance(q, g, "euclidean", squared=True).numpy(), euclid ** 2, atol=1e-4)
    # a vector against itself: exactly 0, never NaN from a negative rounding error
    assert compute_distance(q[:1], q[:1], "euclidean").item() == pytest.approx(0, abs=1e-3)
    half = compute_distance(torch.from_numpy(q).half(), torch.from_numpy(g).bfloat16())
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), -(q @ g.T), atol=0.1)
    with pytest.raises(ValueError, match="unknown distance metric"):
        compute_distance(q, g, "manhattan")
    with pytest.raises(ValueError, match="dimension"):
        compute_distance(q, g[:, :4])


# ------------------------------------------------------------------------- benchmark


def test_evaluate_uses_one_cpu_thread_and_restores_the_callers():
    rng = np.random.default_rng(3)
    d = rng.random((40, 30))
    qp, gp = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    qc, gc = rng.integers(1, 10, 40), rng.integers(1, 10, 30)
    before = torch.get_num_threads()
    seen = []
    original = metrics._evaluate

    def spy(*args):
        seen.append(torch.get_num_threads())
        return original(*args)

    try:
        torch.set_num_threads(2)
        metrics._evaluate = spy
        got = evaluate(d, qp, gp, qc, gc, "llcm")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        metrics._evaluate = original
        torch.set_num_threads(before)
    ref = reference_evaluate(d, qp, gp, qc, gc, "llcm", sort_kind="stable")
    assert got["mAP"] == pytest.approx(float(ref["mAP"]), abs=1e-12)


def test_bench_eval_runs_and_agrees_with_the_reference():
    """benchmarks/bench_eval.py --quick (smoke run; timings are not asserted)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = "sysu_single_shot,llcm_like,market_like,random_llcm,sysu_10_trials"
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_eval.py"), "--quick", "--cases",
                          cases, "--repeat", "1", "--ref-repeat", "1", "--contended", "1"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert [c["name"] for c in report["cases"]] == cases.split(",") + ["random_llcm_contended"]
    contended = report["cases"].pop()
    assert contended["identical_outputs"] and contended["competitors"] == 1 and contended["idle_s"] > 0
    for case in report["cases"]:
        assert case["identical_within_1e_6"], case
        assert case["evaluator_s"] > 0 and case["reference_s"] > 0
    assert report["cases"][0]["shape"] == [950, 301]  # quarter of the queries, the full SYSU gallery
