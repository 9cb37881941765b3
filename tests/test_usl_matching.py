"""DTNL neighbour sets, camera-aware pruning and the greedy cross-modal cluster matching
against the released code (tests/golden/cmag/dtnl_neighbours.pt, cluster_matching.pt),
with the remove-while-iterating quirk, its fix, the mirror branch and the mixed memories."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.dtnl import (NeighbourSets, camera_local_index, dtnl_neighbour_sets, prune_by_camera,
                          token_neighbours)
from cluster.matching import (ClusterMatch, MatchingError, build_mixed_memories, match_clusters, mixed_centroids,
                              relabel)
from loss.distances import identity_centres

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
RTOL, ATOL = 1e-5, 1e-6
DTYPES = (torch.float32, torch.float64)
KINDS = ("ir", "rgb", "i2r", "r2i")


@pytest.fixture(scope="module")
def dtnl():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.load(os.path.join(GOLDEN, "dtnl_neighbours.pt"), weights_only=True)


@pytest.fixture(scope="module")
def matching():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.load(os.path.join(GOLDEN, "cluster_matching.pt"), weights_only=True)


def _sets(data, dtype=torch.float32, chunk_size=1024):
    inputs, params = data["inputs"], data["params"]
    return dtnl_neighbour_sets(F.normalize(inputs["features_ir"].to(dtype), dim=1),
                               F.normalize(inputs["features_rgb"].to(dtype), dim=1), params["K"],
                               threshold=params["k"], min_votes=params["x"], chunk_size=chunk_size)


def _items(data):
    inputs = data["inputs"]
    camera_local = {cam: camera_local_index(rows) for cam, rows in inputs["camera_local_files"].items()}
    rgb, ir = inputs["train_rgb_sorted"], inputs["train_ir_sorted"]
    return ([r[0] for r in ir], [r[2] for r in ir], [r[0] for r in rgb], [r[2] for r in rgb]), camera_local


@pytest.mark.parametrize("chunk_size", (1024, 7))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtnl_lists_match_golden(dtnl, dtype, chunk_size):
    sets = _sets(dtnl, dtype, chunk_size)
    for kind in KINDS:
        assert getattr(sets, kind) == dtnl["outputs"]["before_pruning"]["topk_" + kind], kind


def test_pruning_matches_golden_and_draws_one_number_per_removal(dtnl):
    sets = _sets(dtnl)
    items, camera_local = _items(dtnl)
    random.seed(dtnl["params"]["python_random_seed_before_pruning"])
    removed = prune_by_camera(sets, *items, camera_local, decay=dtnl["params"]["decay"])
    after = random.random()
    for kind in KINDS:
        assert getattr(sets, kind) == dtnl["outputs"]["after_pruning"]["topk_" + kind], kind
        assert removed[kind] == dtnl["bookkeeping"]["topk_" + kind]["removed"]
    random.seed(dtnl["params"]["python_random_seed_before_pruning"])
    for _ in range(sum(removed.values())):
        random.random()
    assert random.random() == after


def test_fix_prune_skip_removes_every_prunable_pair(dtnl):
    sets = _sets(dtnl)
    items, camera_local = _items(dtnl)
    removed = prune_by_camera(sets, *items, camera_local, rng=random.Random(0), fix_prune_skip=True)
    before = dtnl["outputs"]["before_pruning"]
    for kind in KINDS:
        prunable = {tuple(p) for p in dtnl["bookkeeping"]["topk_" + kind]["prunable_pairs"]}
        expected = [[j for j in row if (i, j) not in prunable] for i, row in enumerate(before["topk_" + kind])]
        assert getattr(sets, kind) == expected and removed[kind] == len(prunable)
    kept = dtnl["bookkeeping"]["topk_rgb"]["prunable_but_kept_pairs"]
    assert kept, "the golden exercises the skip quirk"


def test_pruning_decay_and_local_outliers():
    # one camera 0; anchor a (local label 0); n1 other local label; n2 absent (local outlier); n3 other camera
    sets = NeighbourSets(ir=[[0, 1, 2, 3], [], [], []], rgb=[], i2r=[[], [], [], []], r2i=[])
    files, cams = ["a", "n1", "n2", "n3"], [0, 0, 0, 1]
    camera_local = {0: {"a": "0", "n1": "1"}, 1: {}}

    class Always:
        def __init__(self, value):
            self.value, self.calls = value, 0

        def random(self):
            self.calls += 1
            return self.value

    high = Always(0.9)
    prune_by_camera(sets, files, cams, [], [], camera_local, decay=0.5, rng=high)
    assert sets.ir[0] == [0, 1, 2, 3] and high.calls == 1
    low = Always(0.1)
    prune_by_camera(sets, files, cams, [], [], camera_local, decay=0.5, rng=low)
    assert sets.ir[0] == [0, 2, 3] and low.calls == 1
    with pytest.raises(ValueError, match="camera 7"):
        prune_by_camera(sets, files, [7, 0, 0, 1], [], [], camera_local)


def test_token_neighbours_first_occurrence_order_with_fewer_votes():
    # two tokens of width 1 (the slices are used unnormalised): token 0 prefers j=2, token 1 prefers j=0
    query = torch.tensor([[1.0, 1.0]])
    gallery = torch.tensor([[0.1, 1.0], [0.5, 0.5], [1.0, 0.1]])
    assert token_neighbours(query, gallery, 2, threshold=0.9, min_votes=1) == [[2, 0]]
    assert token_neighbours(query, gallery, 2, threshold=0.9) == [[]]
    assert token_neighbours(query, gallery, 2, threshold=0.4, min_votes=2) == [[1]]
    with pytest.raises(ValueError, match="multiple of 3"):
        token_neighbours(query, gallery, 3)


def test_neighbour_sets_pack_roundtrip():
    sets = NeighbourSets(ir=[[0, 2], [], [1]], rgb=[[]], i2r=[[5], [6, 7], []], r2i=[[0, 1, 2]])
    state = sets.pack()
    assert all(v.dtype == torch.int64 for v in state.values())
    assert NeighbourSets.unpack(state) == sets


def _golden_match(out):
    rgb, ir = (F.normalize(out["cluster_features_" + side], dim=1) for side in ("rgb", "ir"))
    return match_clusters(rgb, ir)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ("sysu", "regdb_mirror"))
def test_matching_matches_golden(matching, case, dtype):
    out = matching["outputs"][case]
    centroids_rgb = F.normalize(out["cluster_features_rgb"].to(dtype), dim=1)
    centroids_ir = F.normalize(out["cluster_features_ir"].to(dtype), dim=1)
    match = match_clusters(centroids_rgb, centroids_ir, capacity=out["lamba_k"])
    assert match.mirror == (case == "regdb_mirror")
    assert match.r2i == out["r2i"] and list(match.r2i) == out["r2i_insertion_order"]
    assert match.i2r == out["i2r"] and list(match.i2r) == out["i2r_insertion_order"]
    assert sorted(match.r2i.items()) == [tuple(p) for p in out["r2i_items"]]
    assert torch.equal(match.counts, out["final_column_counts"])
    assert torch.allclose(match.similarity.float(), out["similarity_exp_cos"], rtol=RTOL, atol=ATOL)


def test_matching_statistics_and_consistency(matching):
    out = matching["outputs"]["sysu"]
    match = _golden_match(out)
    # i2r[4] = [4] was added in pass 2: RGB cluster 4 keeps its pass-1 partner 2
    assert match.stats() == {"rgb_clusters": 7, "ir_clusters": 5, "mirror": False, "shared_columns": 3,
                             "second_pass_partners": 1}
    assert match.rgb_to_ir(4) == 2 and match.ir_to_rgb(4) == 4
    assert match.mates(0, ir_anchor=False) == (0, 1) and match.mates(4, ir_anchor=False) is None


@pytest.mark.parametrize("seed", range(6))
def test_matching_invariants_on_random_centroids(seed):
    gen = torch.Generator().manual_seed(seed)
    n_rgb, n_ir = [int(v) for v in torch.randint(3, 12, (2,), generator=gen)]
    n_rgb, n_ir = min(n_rgb, 2 * n_ir), min(n_ir, 2 * n_rgb)
    rgb = F.normalize(torch.randn(n_rgb, 8, generator=gen), dim=1)
    ir = F.normalize(torch.randn(n_ir, 8, generator=gen), dim=1)
    match = match_clusters(rgb, ir)
    rows, cols = (match.i2r, match.r2i) if match.mirror else (match.r2i, match.i2r)
    n_rows, n_cols = max(n_rgb, n_ir), min(n_rgb, n_ir)
    assert sorted(rows) == list(range(n_rows)) and sorted(cols) == list(range(n_cols))
    assert all(1 <= len(members) <= 2 for members in cols.values())
    assert all(r in cols[c] for r, c in rows.items())  # every pass-1 assignment is in the column list
    assert match.counts.tolist() == [float(len(cols[c])) for c in range(n_cols)]
    # the first pick is the global maximum of the similarity, which the greedy rule always takes
    similarity = match.similarity.numpy()
    r, c = np.unravel_index(np.argmax(similarity), similarity.shape)
    assert rows[int(r)] == int(c)


def test_matching_errors():
    rgb, ir = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(MatchingError, match="no branch for fewer RGB"):
        match_clusters(rgb, ir, allow_mirror=False)
    assert match_clusters(rgb, ir, allow_mirror=True).mirror
    with pytest.raises(MatchingError, match="cannot be matched"):
        match_clusters(F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1))


def test_second_pass_fix_gives_each_unmatched_cluster_one_partner():
    """9 x 9 random centroids, capacity 6: the released second pass fills one cluster and runs
    out of rows for some seeds; the fix never does, keeps pass 1, and adds one partner each."""
    failed = 0
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        rgb = F.normalize(torch.randn(9, 16, generator=gen), dim=1)
        ir = F.normalize(torch.randn(9, 16, generator=gen), dim=1)
        fixed = match_clusters(rgb, ir, capacity=6, fix_second_pass=True)
        try:
            released = match_clusters(rgb, ir, capacity=6)
        except MatchingError as exc:
            assert "ran out of the 9 clusters" in str(exc)
            failed += 1
        else:
            assert released.r2i == fixed.r2i
        assert sorted(fixed.i2r) == list(range(9))
        # pass 1 is the same; pass 2 added exactly one row to each column pass 1 left empty
        pass1 = {}
        for r, c in fixed.r2i.items():
            pass1.setdefault(c, []).append(r)
        for c, members in fixed.i2r.items():
            assert members[:len(pass1.get(c, []))] == pass1.get(c, [])
            assert len(members) == len(pass1[c]) if c in pass1 else len(members) == 1
    assert failed > 0  # the case exists


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ("sysu", "regdb_mirror"))
def test_relabelling_and_mixed_memories_match_golden(matching, case, dtype):
    inputs, out = matching["inputs"][case], matching["outputs"][case]
    features_rgb, features_ir = inputs["features_rgb"].to(dtype), inputs["features_ir"].to(dtype)
    labels_rgb, labels_ir = inputs["pseudo_labels_rgb"], inputs["pseudo_labels_ir"]
    for features, labels, name in ((features_rgb, labels_rgb, "rgb"), (features_ir, labels_ir, "ir")):
        keep = labels != -1
        centres, _, _ = identity_centres(features[keep], labels[keep])
        assert torch.allclose(centres.float(), out["cluster_features_" + name], rtol=RTOL, atol=ATOL)
    match = _golden_match(out)
    assert torch.equal(relabel(labels_rgb, match.rgb_to_ir), out["pseudo_labels_rgb_in_ir_space"])
    assert torch.equal(relabel(labels_ir, match.ir_to_rgb), out["pseudo_labels_ir_in_rgb_space"])
    mixed_ir, mixed_rgb = mixed_centroids(features_rgb, features_ir, labels_rgb, labels_ir, match)
    assert mixed_ir.dtype == dtype
    assert torch.allclose(mixed_ir.float(), out["memory_mixIR"], rtol=RTOL, atol=ATOL)
    assert torch.allclose(mixed_rgb.float(), out["memory_mixRGB"], rtol=RTOL, atol=ATOL)
    memory_ir, memory_rgb = build_mixed_memories(features_rgb, features_ir, labels_rgb, labels_ir, match,
                                                 momentum=out["memory_mixIR_momentum"])
    assert memory_ir.momentum == 0.8 and memory_rgb.temp == 0.05
    assert torch.equal(memory_ir.features, mixed_ir) and torch.equal(memory_rgb.features, mixed_rgb)


def test_mixed_memories_need_every_label():
    match = ClusterMatch(r2i={0: 0, 1: 0}, i2r={0: [0, 1], 1: [1]}, mirror=False, counts=None, similarity=None)
    features = torch.randn(4, 3)
    with pytest.raises(MatchingError, match="do not cover"):
        mixed_centroids(features[:2], features[2:], torch.tensor([0, 1]), torch.tensor([0, 0]), match)
