"""cluster.knn, cluster.jaccard and the shared core evaluation.kreciprocal.

Expectations: the golden cases of the reference clustering code (tests/golden/cmag/jaccard_*.pt,
every intermediate), the dense numpy reference tests/reference_jaccard.py on other inputs
(ties, odd k1, k2 wider than the search, no query expansion), and per-row loops for the core
functions.
"""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.jaccard import SparseJaccard, jaccard_distance, jaccard_from_weights, kreciprocal_weights
from cluster.knn import block_pairs, nearest_neighbours, products
from evaluation.kreciprocal import (SparseRows, expanded_sets, half_k, overlap_blocks, query_expansion,
                                    reciprocal_lists)
from reference_jaccard import reference_initial_rank, reference_jaccard
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
CASES = ("jaccard_tiny", "jaccard_sysu_like", "jaccard_regdb_like")


@pytest.fixture(scope="module", params=CASES)
def golden(request):
    case = torch.load(os.path.join(GOLDEN, request.param + ".pt"), weights_only=True)
    case["name"] = request.param
    case["sparse"] = jaccard_distance(case["inputs"]["features"], case["params"]["k1"], case["params"]["k2"])
    return case


def clustered(seed, n, dim=32, centres=8, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1)


def tied_features(seed, n):
    """Unit rows with 4 entries 0.5 among 16: every inner product is exact, many distances tie."""
    rng = np.random.default_rng(seed)
    rows = set()
    while len(rows) < n:
        rows.add(tuple(sorted(rng.choice(16, 4, replace=False))))
    x = np.zeros((n, 16), dtype=np.float32)
    for i, r in enumerate(rng.permutation(sorted(rows))):
        x[i, list(r)] = 0.5
    return torch.from_numpy(x)


def test_half_k_rounds_ties_to_even():
    assert [half_k(k) for k in (30, 5, 7, 9, 1, 2, 3)] == [15, 2, 4, 4, 0, 1, 2]


def test_golden_neighbours_and_reciprocal_sets(golden):
    x, p, inter = golden["inputs"]["features"], golden["params"], golden["intermediates"]
    nbr = nearest_neighbours(x, p["k1"])
    assert nbr.dtype == torch.int64 and nbr.shape == (p["N"], p["k1"])
    assert torch.equal(nbr, inter["initial_rank"])
    assert reciprocal_lists(nbr, p["k1"]) == inter["nn_k1"]
    assert reciprocal_lists(nbr, p["k1_half"]) == inter["nn_k1_half"]
    assert half_k(p["k1"]) == p["k1_half"]


def test_golden_weights_and_jaccard(golden):
    x, p, inter = golden["inputs"]["features"], golden["params"], golden["intermediates"]
    nbr = inter["initial_rank"]
    v = kreciprocal_weights(x, nbr, p["k1"])
    before = inter["V_before_query_expansion"]
    assert torch.equal(v.to_dense() != 0, before != 0)
    torch.testing.assert_close(v.to_dense(), before, rtol=0, atol=1e-6)
    v = query_expansion(v, nbr, p["k2"])
    after = inter["V_after_query_expansion"]
    assert torch.equal(v.to_dense() != 0, after != 0)
    torch.testing.assert_close(v.to_dense(), after, rtol=0, atol=1e-6)
    expected = golden["outputs"]["jaccard"]
    got = golden["sparse"]
    assert isinstance(got, SparseJaccard) and got.values.dtype == torch.float32
    dense = got.to_dense()
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)
    # the stored pairs are exactly those the reference gives a distance below 1
    stored = torch.zeros(p["N"], p["N"], dtype=torch.bool)
    stored[got.row_ids(), got.indices] = True
    assert torch.equal(stored | (expected < 1), stored)
    assert torch.all(expected[~stored] == 1.0)
    assert torch.all(got.values >= 0) and torch.all(torch.diagonal(dense) < 1e-6)


def test_small_memory_budget_gives_identical_result(golden):
    """A budget that splits every step into blocks (one-row blocks on the tiny case)."""
    x, p = golden["inputs"]["features"], golden["params"]
    full = golden["sparse"]
    tiny = jaccard_distance(x, p["k1"], p["k2"], memory_mb=0.01 if p["N"] < 100 else 0.5)
    assert torch.equal(full.indptr, tiny.indptr) and torch.equal(full.indices, tiny.indices)
    assert torch.equal(full.values, tiny.values)


def test_max_distance_keeps_the_close_pairs(golden):
    x, p = golden["inputs"]["features"], golden["params"]
    full = golden["sparse"]
    near = jaccard_distance(x, p["k1"], p["k2"], max_distance=0.5)
    keep = full.values <= 0.5
    assert torch.equal(near.indices, full.indices[keep]) and torch.equal(near.values, full.values[keep])
    assert torch.equal(near.row_ids(), full.row_ids()[keep])
    with pytest.raises(ValueError, match="max_distance"):
        near.to_dense()
    with pytest.raises(ValueError, match="exceeds"):
        near.radius_graph(0.6)


@pytest.mark.parametrize("seed,n,k1,k2", [(0, 90, 7, 3), (1, 70, 9, 1), (2, 60, 4, 6), (3, 50, 5, 8), (4, 120, 12, 6)])
def test_matches_dense_reference(seed, n, k1, k2):
    x = clustered(seed, n)
    expected, inter = reference_jaccard(x.numpy(), k1, k2, return_intermediates=True)
    nbr = nearest_neighbours(x, k1)
    assert np.array_equal(nbr.numpy(), inter["initial_rank"])
    assert reciprocal_lists(nbr, k1) == inter["nn_k1"]
    assert reciprocal_lists(nbr, half_k(k1)) == inter["nn_k1_half"]
    v = query_expansion(kreciprocal_weights(x, nbr, k1), nbr, k2)
    np.testing.assert_allclose(v.to_dense().numpy(), inter["V_after_query_expansion"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(jaccard_distance(x, k1, k2).to_dense().numpy(), expected, rtol=0, atol=1e-5)


def test_exact_ties_are_ordered_by_index():
    x = tied_features(5, 150)
    for k1 in (6, 11):
        expected, inter = reference_jaccard(x.numpy(), k1, 4, return_intermediates=True)
        for mb in (256, 0.001):
            assert np.array_equal(nearest_neighbours(x, k1, memory_mb=mb).numpy(), inter["initial_rank"])
        np.testing.assert_allclose(jaccard_distance(x, k1, 4).to_dense().numpy(), expected, rtol=0, atol=1e-5)


def test_knn_puts_the_item_first_and_orders_by_distance():
    x = clustered(7, 200, dim=16)
    nbr = nearest_neighbours(x, 10, memory_mb=0.003)
    assert torch.equal(nbr[:, 0], torch.arange(200))
    d = torch.cdist(x.double(), x.double()) ** 2
    picked = d.gather(1, nbr)
    assert torch.all(picked[:, 1:].diff(dim=1) >= -1e-6)
    # nothing outside a row's list is closer than its last entry
    outside = d.scatter(1, nbr, float("inf"))
    assert torch.all(outside.min(1).values >= picked[:, -1] - 1e-6)


def test_block_pairs_cover_every_pair_of_rows_once():
    for n, mb in ((1, 256), (10, 0.0001), (37, 0.003), (100, 0.0016)):
        block, pairs = block_pairs(n, mb)
        seen = np.zeros((n, n), dtype=np.int64)
        for a, ea, b, eb in pairs:
            assert ea - a <= block and eb - b <= block and a <= b
            seen[a:ea, b:eb] += 1
            if a != b:
                seen[b:eb, a:ea] += 1
        assert (seen == 1).all(), (n, mb)
    assert len(block_pairs(100, 0.0016)[1]) == 10 * 11 // 2  # 0.0016 MB: blocks of 10 rows


def test_cpu_products_are_the_float32_products():
    x = clustered(5, 60, dim=24)
    exact = x.double() @ x.double().T
    got = products(x, x)
    assert got.dtype == torch.float32 and got.shape == (60, 60)
    assert torch.allclose(got.double(), exact, rtol=0, atol=1e-5)


def test_deterministic():
    x = clustered(8, 150)
    a, b = jaccard_distance(x, 10, 4), jaccard_distance(x, 10, 4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def loop_expanded_sets(nbr, k1, rule):
    nbr = nbr.tolist()

    def recip(i, k):
        return [j for j in nbr[i][:k + 1] if i in nbr[j][:k + 1]]

    out = []
    for i in range(len(nbr)):
        base = recip(i, k1)
        expanded = set(base)
        for c in base:
            half = recip(c, half_k(k1))
            shared = len(set(half) & set(base))
            if (3 * shared >= 2 * len(half)) if rule == "paper" else (shared > 2 / 3 * len(half)):
                expanded |= set(half)
        out += [(i, j) for j in sorted(expanded)]
    return out


@pytest.mark.parametrize("rule", ["released", "paper"])
@pytest.mark.parametrize("width", [5, 6, 9])
def test_expanded_sets_match_loop(rule, width):
    x = clustered(9, 80, dim=8, noise=0.9)
    nbr = nearest_neighbours(x, width)
    k1 = 5
    rows, cols = expanded_sets(nbr, k1, rule, chunk=7)
    assert list(zip(rows.tolist(), cols.tolist())) == loop_expanded_sets(nbr, k1, rule)


def test_the_two_rules_differ_where_a_set_shares_exactly_two_thirds():
    x = clustered(9, 80, dim=8, noise=0.9)
    nbr = nearest_neighbours(x, 6)
    released, paper = expanded_sets(nbr, 5, "released"), expanded_sets(nbr, 5, "paper")
    assert len(paper[0]) > len(released[0])
    with pytest.raises(ValueError, match="expansion rule"):
        expanded_sets(nbr, 5, "loose")


def random_sparse(seed, n_rows, n_cols, density):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n_rows, n_cols, generator=g) * (torch.rand(n_rows, n_cols, generator=g) < density)
    rows, cols = torch.nonzero(dense, as_tuple=True)
    return SparseRows(rows, cols, dense[rows, cols], n_rows, n_cols), dense


def test_query_expansion_is_the_mean_of_the_neighbour_rows():
    v, dense = random_sparse(10, 40, 40, 0.2)
    g = torch.Generator().manual_seed(11)
    nbr = torch.stack([torch.cat([torch.tensor([i]), torch.randperm(40, generator=g)[:7]]) for i in range(40)])
    for k2 in (1, 3, 8, 12):
        got = query_expansion(v, nbr, k2, max_entries=50)
        width = min(k2, 8)
        expected = np.stack([dense.numpy()[nbr[i, :width].numpy()].mean(0) for i in range(40)]) if k2 > 1 else dense
        np.testing.assert_array_equal(got.to_dense().numpy(), np.asarray(expected, dtype=np.float32))
        assert torch.equal(got.rows * 40 + got.cols, torch.sort(got.rows * 40 + got.cols).values)


def test_overlap_blocks_sum_the_shared_minima():
    a, da = random_sparse(12, 17, 30, 0.3)
    b, db = random_sparse(13, 23, 30, 0.3)
    expected = torch.minimum(da[:, None, :], db[None, :, :]).sum(-1)
    for max_pairs, max_block in ((1 << 20, 1 << 20), (5, 40), (1, 1)):
        got = torch.zeros(17, 23)
        covered = []
        for s, e, first, block in overlap_blocks(a, b, max_pairs, max_block):
            assert first == 0 and block.shape == (e - s, 23)
            got[s:e] = block
            covered += list(range(s, e))
        assert covered == list(range(17))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_overlap_blocks_upper_triangle():
    a, da = random_sparse(15, 29, 29, 0.3)
    expected = torch.minimum(da[:, None, :], da[None, :, :]).sum(-1).triu()
    for max_pairs, max_block in ((1 << 20, 1 << 20), (7, 60), (1, 1)):
        got = torch.zeros(29, 29)
        for s, e, first, block in overlap_blocks(a, a, max_pairs, max_block, upper=True):
            assert first == s and block.shape == (e - s, 29 - s)
            got[s:e, s:] = block
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_jaccard_from_weights_formula():
    v, dense = random_sparse(14, 25, 25, 0.3)
    dense = dense / dense.sum(1, keepdim=True).clamp(min=1e-6)
    rows, cols = torch.nonzero(dense, as_tuple=True)
    v = SparseRows(rows, cols, dense[rows, cols], 25, 25)
    m = torch.minimum(dense[:, None, :], dense[None, :, :]).sum(-1)
    expected = (1 - m / (2 - m)).clamp(min=0)
    torch.testing.assert_close(jaccard_from_weights(v).to_dense(), expected, rtol=0, atol=1e-6)


def test_bad_inputs():
    x = clustered(15, 40)
    with pytest.raises(ValueError, match="L2-normalised"):
        jaccard_distance(2 * x, 5, 2)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jaccard_distance(bad, 5, 2)
    with pytest.raises(ValueError, match="at least 50"):
        jaccard_distance(x, 50, 2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        jaccard_distance(x[0], 5, 2)
    with pytest.raises(ConfigError, match="KNN_BACKEND"):
        nearest_neighbours(x, 5, backend="annoy")


def test_faiss_backend_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="faiss package"):
        jaccard_distance(clustered(16, 40), 5, 2, knn_backend="faiss")


def test_faiss_backend_contract(monkeypatch, golden):
    """The faiss path builds an IndexFlatL2, adds the features and returns its search as int64."""
    calls = []

    class IndexFlatL2:
        def __init__(self, dim):
            calls.append(("dim", dim))

        def add(self, data):
            self.data = data

        def search(self, queries, k):
            calls.append(("search", queries.shape, k, queries.dtype))
            rank = reference_initial_rank(self.data, k)
            return np.zeros(rank.shape, np.float32), rank

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatL2=IndexFlatL2))
    x, p = golden["inputs"]["features"], golden["params"]
    got = jaccard_distance(x, p["k1"], p["k2"], knn_backend="faiss")
    assert calls == [("dim", p["D"]), ("search", (p["N"], p["D"]), p["k1"], np.float32)]
    torch.testing.assert_close(got.to_dense(), golden["outputs"]["jaccard"], rtol=0, atol=1e-5)
