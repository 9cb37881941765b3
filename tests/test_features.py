"""evaluation/embeddings.py: extraction layout, flip TTA, embedding presets, distances, split
evaluation, save/load.

Small linear stand-in models (flip- and modality-sensitive) with the embedding sets and
presets of CMFN and of its baseline keep these tests fast; the real models are exercised end
to end in tests/test_test_py.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from data import DatasetError
from evaluation.embeddings import (
    distance_from_features,
    embedding_weights,
    evaluate_features,
    extract_features,
    load_features,
    save_features,
    stack_features,
    used_gallery_columns,
)
from model.base import ReIDModel
from model.cmfn.baseline import Baseline
from model.cmfn.cmfn import CMFN
from reference_eval import reference_evaluate
from utils.config import build_config
from utils.errors import ConfigError

torch.set_num_threads(1)

H, W, D = 8, 4, 5
# the released feat1..feat6 order
FEATURE_SETS = ("pool_orig", "bn_orig", "pool_br1", "bn_br1", "pool_br2", "bn_br2")


class LinearReID(ReIDModel):
    """Eval forward under the model contract with CMFN's sets and presets: a dict set ->
    [N, D], L2-normalised; one (pool, bn) pair of sets per copy."""

    embedding_sets = CMFN.embedding_sets
    embedding_presets = CMFN.embedding_presets
    default_embedding = CMFN.default_embedding
    num_copies = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        copies = self.num_copies
        self.pool = nn.ModuleList(nn.Linear(3 * H * W, D) for _ in range(copies))
        self.bn = nn.ModuleList(nn.Linear(D, D) for _ in range(copies))
        self.ir_shift = nn.Parameter(torch.randn(3, H, W))
        self.calls = []

    def forward(self, images, modality, camids=None):
        self.calls.append((images.shape[0], modality, self.training))
        x = images + self.ir_shift if modality == "infrared" else images
        out = {}
        for c, (pool, bn) in enumerate(zip(self.pool, self.bn)):
            p = pool(x.flatten(1))
            out[self.embedding_sets[2 * c]] = F.normalize(p, dim=1)
            out[self.embedding_sets[2 * c + 1]] = F.normalize(bn(p), dim=1)
        return out


class LinearBaseline(LinearReID):
    """The same with the baseline's two sets and presets."""

    embedding_sets = Baseline.embedding_sets
    embedding_presets = Baseline.embedding_presets
    default_embedding = Baseline.default_embedding
    num_copies = 1


MODELS = {3: LinearReID, 1: LinearBaseline}


class Images(Dataset):
    def __init__(self, n, seed=0):
        self.x = torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def make_cfg(*opts):
    return build_config(None, opts=["TEST.BATCH_SIZE", "3", "TEST.NUM_WORKERS", "0"] + list(opts))


def direct(model, x, modality):
    """Per-set outputs of one eval-mode model call on all images."""
    model.eval()
    with torch.no_grad():
        return model(x, modality=modality)


@pytest.mark.parametrize("copies,names", [(3, FEATURE_SETS), (1, ("pool_orig", "bn_orig"))])
def test_layout_without_flip(copies, names):
    model, data = MODELS[copies](), Images(7)
    feats = extract_features(model, data, make_cfg(), "visible", "cpu", flip=False)
    assert tuple(feats) == names
    expected = direct(model, data.x, "visible")
    for name in names:
        assert feats[name].dtype == torch.float32 and feats[name].shape == (7, D)
        torch.testing.assert_close(feats[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_flip_combines_normalised_outputs(mode):
    model, data = LinearReID(), Images(5)
    feats = extract_features(model, data, make_cfg("TEST.FLIP_MODE", mode), "infrared", "cpu", flip=True)
    plain = direct(model, data.x, "infrared")
    mirrored = direct(model, data.x.flip(3), "infrared")
    for name in FEATURE_SETS:
        both = plain[name] + mirrored[name]
        expected = both if mode == "sum" else both / both.norm(dim=1, keepdim=True)
        torch.testing.assert_close(feats[name], expected, rtol=1e-5, atol=1e-6)
    norms = feats["bn_orig"].norm(dim=1)
    if mode == "sum":  # summed unit vectors are not renormalised (released): norms in (1, 2]
        assert torch.all(norms <= 2 + 1e-5) and torch.all(norms > 1)
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_config_flip_default_modality_and_mode_restored():
    model, data = LinearReID(), Images(4)
    model.train()
    feats = extract_features(model, data, make_cfg("TEST.FLIP", "True"), "infrared", "cpu")
    assert model.training
    assert all(m == "infrared" and not training for _, m, training in model.calls)
    assert len(model.calls) == 2 * 2  # two batches of <= 3, each also mirrored
    assert feats["pool_orig"].norm(dim=1).max() > 1.01  # flipped sum


def test_bf16_autocast_close_to_fp32():
    model, data = LinearReID(), Images(6)
    f32 = extract_features(model, data, make_cfg(), "visible", "cpu", flip=False)
    b16 = extract_features(model, data, make_cfg("TEST.AMP", "bf16"), "visible", "cpu", flip=False)
    for name in FEATURE_SETS:
        assert b16[name].dtype == torch.float32
        torch.testing.assert_close(b16[name], f32[name], rtol=0, atol=3e-2)


def test_bad_options_and_missing_image(tmp_path):
    model = LinearReID()
    with pytest.raises(ValueError, match="TEST.FLIP_MODE"):
        extract_features(model, Images(2), make_cfg("TEST.FLIP_MODE", "max"), "visible", "cpu")
    with pytest.raises(ValueError, match="modality"):
        extract_features(model, Images(2), make_cfg(), "thermal", "cpu")
    missing = str(tmp_path / "cam1" / "0001" / "0001.jpg")
    with pytest.raises(DatasetError, match="0001.jpg"):
        extract_features(model, [missing], make_cfg(), "visible", "cpu")
    with pytest.raises(ConfigError, match=r"TEST\.FEATURE 'concat' is not an embedding of the LinearReID model "
                                          r"\(known: sum6, mix, orig, pool, bn\)"):
        embedding_weights(model, "concat")


def test_wrong_row_count_is_an_error():
    class Short(LinearReID):
        def forward(self, images, modality, camids=None):
            return {k: v[:-1] for k, v in super().forward(images, modality).items()}

    with pytest.raises(RuntimeError, match="2 rows of pool_orig for a batch of 3"):
        extract_features(Short(), Images(3), make_cfg(), "visible", "cpu", flip=False)


def test_cmfn_and_baseline_presets():
    """The test embeddings of the released code: sum6 every set at weight 1 (the default), mix
    the pool sets at 0.1 and the BN sets at 0.9, orig the original copy's two sets, pool and bn
    the sets of one kind; the baseline's presets are the same over its two sets."""
    expected = {
        "sum6": [(n, 1.0) for n in FEATURE_SETS],
        "mix": [("pool_orig", 0.1), ("bn_orig", 0.9), ("pool_br1", 0.1), ("bn_br1", 0.9), ("pool_br2", 0.1),
                ("bn_br2", 0.9)],
        "orig": [("pool_orig", 1.0), ("bn_orig", 1.0)],
        "pool": [("pool_orig", 1.0), ("pool_br1", 1.0), ("pool_br2", 1.0)],
        "bn": [("bn_orig", 1.0), ("bn_br1", 1.0), ("bn_br2", 1.0)],
    }
    assert CMFN.embedding_sets == FEATURE_SETS and Baseline.embedding_sets == FEATURE_SETS[:2]
    for cls in (CMFN, Baseline):
        assert cls.default_embedding == "sum6"
        assert list(cls.embedding_presets) == list(expected)
        for preset, weights in expected.items():
            assert cls.embedding_weights(preset) == [(n, w) for n, w in weights if n in cls.embedding_sets]
        assert cls.embedding_weights("") == cls.embedding_weights("sum6")
    assert Baseline.embedding_weights("pool") == [("pool_orig", 1.0)]
    # through evaluation.embeddings, from a model (wrapped or not); empty = the default
    model = LinearBaseline()
    assert embedding_weights(model, "mix") == [("pool_orig", 0.1), ("bn_orig", 0.9)]
    assert embedding_weights(nn.DataParallel(model), "") == [("pool_orig", 1.0), ("bn_orig", 1.0)]


def weights(preset, cls=CMFN):
    return cls.embedding_weights(preset)


def random_feats(n, seed, sets=FEATURE_SETS):
    g = torch.Generator().manual_seed(seed)
    return {name: F.normalize(torch.randn(n, D, generator=g), dim=1) for name in sets}


def test_sum6_is_sum_of_six_inner_products_and_one_concat_matmul():
    q, g = random_feats(6, 1), random_feats(9, 2)
    dist = distance_from_features(q, g, weights("sum6"), "cosine")
    six = sum(q[n] @ g[n].T for n in FEATURE_SETS)
    torch.testing.assert_close(dist, -six, rtol=1e-5, atol=1e-5)
    concat = -(torch.cat([q[n] for n in FEATURE_SETS], 1) @ torch.cat([g[n] for n in FEATURE_SETS], 1).T)
    torch.testing.assert_close(dist, concat, rtol=1e-6, atol=1e-6)
    assert dist.dtype == torch.float32 and dist.shape == (6, 9)


def test_mix_weights_and_subsets():
    q, g = random_feats(4, 3), random_feats(5, 4)
    sim = {n: q[n] @ g[n].T for n in FEATURE_SETS}
    pool = sim["pool_orig"] + sim["pool_br1"] + sim["pool_br2"]
    bn = sim["bn_orig"] + sim["bn_br1"] + sim["bn_br2"]
    expected = {"mix": 0.1 * pool + 0.9 * bn, "pool": pool, "bn": bn,
                "orig": sim["pool_orig"] + sim["bn_orig"]}
    for feature, sims in expected.items():
        torch.testing.assert_close(distance_from_features(q, g, weights(feature)), -sims, rtol=1e-5, atol=1e-5)
    # the baseline's two sets: sum6 -> both, mix -> 0.1 / 0.9
    qb, gb = random_feats(4, 5, FEATURE_SETS[:2]), random_feats(5, 6, FEATURE_SETS[:2])
    torch.testing.assert_close(distance_from_features(qb, gb, weights("sum6", Baseline)),
                               -(qb["pool_orig"] @ gb["pool_orig"].T + qb["bn_orig"] @ gb["bn_orig"].T),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distance_from_features(qb, gb, weights("mix", Baseline)),
                               -(0.1 * qb["pool_orig"] @ gb["pool_orig"].T + 0.9 * qb["bn_orig"] @ gb["bn_orig"].T),
                               rtol=1e-5, atol=1e-5)


def test_euclidean_uses_weighted_concatenation():
    q, g = random_feats(4, 7), random_feats(6, 8)
    mix = weights("mix")
    sq = sum((0.1 if n.startswith("pool") else 0.9) * torch.cdist(q[n].double(), g[n].double()) ** 2
             for n in FEATURE_SETS)
    # euclidean: the distance between the weighted concatenations; sqeuclidean (or squared): its square
    dist = distance_from_features(q, g, mix, "euclidean").double()
    assert torch.allclose(dist, sq.sqrt(), atol=1e-5)
    for squared in (distance_from_features(q, g, mix, "sqeuclidean"),
                    distance_from_features(q, g, mix, "euclidean", squared=True)):
        assert squared.dtype == torch.float32
        assert torch.allclose(squared.double(), sq, atol=1e-5)
    stacked = stack_features(q, mix)
    assert stacked.shape == (4, 6 * D)
    torch.testing.assert_close(stacked[:, :D], q["pool_orig"] * 0.1 ** 0.5)
    torch.testing.assert_close(stacked[:, D:2 * D], q["bn_orig"] * 0.9 ** 0.5)


class _List:
    def __init__(self, pids, camids):
        self.pids, self.camids = np.asarray(pids), np.asarray(camids)
        self.paths = ["img_%d.jpg" % i for i in range(len(self.pids))]

    def __len__(self):
        return len(self.pids)


class _Split:
    """A TestSplit stand-in: 24 gallery candidates, 3 trials using 8 of them each."""

    def __init__(self, protocol):
        rng = np.random.default_rng(0)
        self.query = _List(rng.integers(0, 12, 10), rng.choice([3, 6], 10))
        self.gallery = _List(np.repeat(np.arange(12), 2), np.tile([1, 2], 12))
        self.trials = [np.sort(rng.choice(24, 8, replace=False)) for _ in range(3)]
        self.trials[0] = np.arange(0, 24, 2)
        self.protocol = protocol
        self.query_modality, self.gallery_modality = "infrared", "visible"
        self.info = {"dataset": "fake"}


def test_used_columns_remap_trials():
    split = _Split("sysu")
    used, trials = used_gallery_columns(split)
    assert np.all(np.diff(used) > 0)
    for t, mapped in zip(split.trials, trials):
        np.testing.assert_array_equal(used[mapped], t)


@pytest.mark.parametrize("protocol", ["sysu", "regdb"])
def test_evaluate_features_matches_loop_reference_per_trial(protocol):
    split = _Split(protocol)
    used, trials = used_gallery_columns(split)
    q = random_feats(len(split.query), 11)
    g = random_feats(len(used), 12)
    cfg = make_cfg("TEST.MAX_RANK", "5")
    result = evaluate_features(q, g, split, cfg, weights("sum6"), used, trials)
    qn = np.concatenate([q[n].numpy() for n in FEATURE_SETS], 1).astype(np.float64)
    gn = np.concatenate([g[n].numpy() for n in FEATURE_SETS], 1).astype(np.float64)
    for t, cols in enumerate(trials):
        ref = reference_evaluate(-(qn @ gn[cols].T), split.query.pids, split.gallery.pids[used][cols],
                                 split.query.camids, split.gallery.camids[used][cols], protocol, max_rank=5)
        got = result["per_trial"][t]
        assert got["rank1"] == pytest.approx(ref["cmc"][0], abs=1e-6)
        assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
        assert got["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)
        np.testing.assert_allclose(got["cmc"], ref["cmc"], atol=1e-6)
    assert result["distmat"].shape == (len(split.query), len(used))


def test_sqeuclidean_ranks_unit_features_like_cosine():
    """On unit-norm sets sum_i w_i |q_i - g_i|^2 = 2 sum_i w_i - 2 sum_i w_i q_i.g_i: the same
    ranking, so the same figures, as the cosine distance (the IV-REID preset's metric)."""
    split = _Split("sysu")
    used, trials = used_gallery_columns(split)
    q, g = random_feats(len(split.query), 13), random_feats(len(used), 14)
    mix = weights("mix")
    cosine = evaluate_features(q, g, split, make_cfg("TEST.MAX_RANK", "5"), mix, used, trials)
    squared = evaluate_features(q, g, split, make_cfg("TEST.MAX_RANK", "5", "TEST.DISTANCE", "sqeuclidean"), mix,
                                used, trials)
    np.testing.assert_allclose(squared["distmat"], 2 * sum(w for _, w in mix) + 2 * cosine["distmat"], atol=1e-5)
    for a, b in zip(cosine["per_trial"], squared["per_trial"]):
        for key in ("rank1", "mAP", "mINP"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_save_and_load_round_trip(tmp_path):
    split = _Split("sysu")
    used, trials = used_gallery_columns(split)
    q, g = random_feats(len(split.query), 1), random_feats(len(used), 2)
    save_features(tmp_path, split, q, g, used, trials, {"feature": "sum6"})
    back = load_features(tmp_path)
    for name in FEATURE_SETS:
        assert torch.equal(back["query"][name], q[name]) and torch.equal(back["gallery"][name], g[name])
    np.testing.assert_array_equal(back["gallery_pids"], split.gallery.pids[used])
    np.testing.assert_array_equal(back["query_camids"], split.query.camids)
    assert back["split"]["gallery_paths"] == [split.gallery.paths[i] for i in used]
    for a, b in zip(back["trials"], trials):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_features(tmp_path / "nowhere")


def test_rerank_applies_k_reciprocal_per_trial():
    from evaluation.rerank import k_reciprocal_rerank

    split = _Split("regdb")
    used, trials = used_gallery_columns(split)
    q = random_feats(len(split.query), 21)
    g = random_feats(len(used), 22)
    cfg = make_cfg("TEST.MAX_RANK", "5", "TEST.RERANK", "True", "TEST.RERANK_K1", "4", "TEST.RERANK_K2", "2")
    result = evaluate_features(q, g, split, cfg, weights("sum6"), used, trials)
    qn = torch.cat([q[n] for n in FEATURE_SETS], 1)
    gn = torch.cat([g[n] for n in FEATURE_SETS], 1)
    for t, cols in enumerate(trials):
        gc = gn[cols]
        d = k_reciprocal_rerank(-(qn @ gc.T), -(qn @ qn.T), -(gc @ gc.T), k1=4, k2=2, lambda_value=0.3,
                                    expansion=cfg.TEST.RERANK_EXPANSION)
        ref = reference_evaluate(d.numpy(), split.query.pids, split.gallery.pids[used][cols],
                                 split.query.camids, split.gallery.camids[used][cols], "regdb", max_rank=5)
        assert result["per_trial"][t]["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert result["reranked"]


class _NearTieSplit:
    """One query (pid 0) and two gallery items: item 0 (pid 1) and item 1 (pid 0, the match).

    With the features of :func:`near_tie_features` the cosine distances are -(1 + 2^-26) and
    -(1 + 2^-25): the match is closer, but both round to -1 in float32, and a tie ranks the
    lower gallery index (the wrong identity) first.
    """

    def __init__(self):
        self.query = _List([0], [3])
        self.gallery = _List([1, 0], [1, 1])
        self.trials = [None]
        self.protocol = "regdb"


def near_tie_features():
    q = {"a": torch.tensor([[1.0, 1.0]])}
    g = {"a": torch.tensor([[1.0, 2.0 ** -26], [1.0, 2.0 ** -25]])}
    return q, g


def test_default_distance_dtype_is_float64_and_keeps_near_ties():
    split, (q, g) = _NearTieSplit(), near_tie_features()
    w = [("a", 1.0)]
    exact = -(np.array([[1.0, 1.0]]) @ np.array([[1.0, 2.0 ** -26], [1.0, 2.0 ** -25]]).T)
    assert exact[0, 1] < exact[0, 0]  # the match (gallery item 1) is the nearer one
    cfg = make_cfg("TEST.MAX_RANK", "2")
    assert cfg.TEST.DISTANCE_DTYPE == "float64"
    default = evaluate_features(q, g, split, cfg, w)
    assert default["distmat"].dtype == np.float64
    np.testing.assert_array_equal(default["distmat"], exact)
    assert default["per_trial"][0]["rank1"] == 1.0
    # float32 makes the two distances equal and ranks the wrong identity first
    single = evaluate_features(q, g, split, make_cfg("TEST.MAX_RANK", "2", "TEST.DISTANCE_DTYPE", "float32"), w)
    assert single["distmat"].dtype == np.float32 and single["distmat"][0, 0] == single["distmat"][0, 1]
    assert single["per_trial"][0]["rank1"] == 0.0
    # the explicit argument wins over the config
    assert evaluate_features(q, g, split, cfg, w, dtype="float32")["per_trial"][0]["rank1"] == 0.0
    # euclidean distances in float64 keep the order too (|q - g0|^2 - |q - g1|^2 is about 2^-25)
    sq = evaluate_features(q, g, split, make_cfg("TEST.MAX_RANK", "2", "TEST.DISTANCE", "sqeuclidean"), w)
    assert sq["per_trial"][0]["rank1"] == 1.0
    with pytest.raises(ConfigError, match="DISTANCE_DTYPE"):
        make_cfg("TEST.DISTANCE_DTYPE", "float16")


def test_evaluate_split_keeps_float32_by_default(monkeypatch):
    """The in-training evaluation (evaluate_split) ranks in float32 unless given a dtype."""
    import evaluation.embeddings as emb

    split, (q, g) = _NearTieSplit(), near_tie_features()
    monkeypatch.setattr(emb, "embedding_weights", lambda model, preset: [("a", 1.0)])
    monkeypatch.setattr(emb, "extract_split_features",
                        lambda model, split, cfg, device, flip=None, keep=None: (q, g, np.arange(2), [np.arange(2)]))
    cfg = make_cfg("TEST.MAX_RANK", "2")
    assert emb.evaluate_split(None, split, cfg, "cpu")["per_trial"][0]["rank1"] == 0.0
    assert emb.evaluate_split(None, split, cfg, "cpu", dtype="float64")["per_trial"][0]["rank1"] == 1.0
    assert emb.evaluate_split(None, split, cfg, "cpu", dtype=None)["per_trial"][0]["rank1"] == 1.0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_rerank_uses_squared_euclidean_of_weighted_concatenation(distance):
    """Re-ranking works on squared Euclidean distances of the sqrt(w)-scaled concatenation,
    whatever TEST.DISTANCE is; the features here have unequal norms (as flip-summed ones), on
    which the cosine distance gives other figures."""
    from test_rerank import loop_rerank

    split = _Split("regdb")
    used, trials = used_gallery_columns(split)
    rng = np.random.default_rng(5)
    q = {n: f * torch.from_numpy(rng.uniform(0.8, 2.0, (len(f), 1))).float()
         for n, f in random_feats(len(split.query), 31).items()}
    g = {n: f * torch.from_numpy(rng.uniform(0.8, 2.0, (len(f), 1))).float()
         for n, f in random_feats(len(used), 32).items()}
    mix = weights("mix")
    scale = {n: (0.1 if n.startswith("pool") else 0.9) ** 0.5 for n in FEATURE_SETS}
    qn = np.concatenate([q[n].numpy().astype(np.float64) * scale[n] for n in FEATURE_SETS], 1)
    gn = np.concatenate([g[n].numpy().astype(np.float64) * scale[n] for n in FEATURE_SETS], 1)
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    cfg = make_cfg("TEST.MAX_RANK", "5", "TEST.RERANK", "True", "TEST.RERANK_K1", "4", "TEST.RERANK_K2", "2",
                   "TEST.DISTANCE", distance)
    result = evaluate_features(q, g, split, cfg, mix, used, trials)
    differs = False
    for t, cols in enumerate(trials):
        args = (split.query.pids, split.gallery.pids[used][cols], split.query.camids,
                split.gallery.camids[used][cols], "regdb")
        ref = reference_evaluate(loop_rerank(sq(qn, gn[cols]), sq(qn, qn), sq(gn[cols], gn[cols]), 4, 2, 0.3),
                                 *args, max_rank=5)
        got = result["per_trial"][t]
        assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
        np.testing.assert_allclose(got["cmc"], ref["cmc"], atol=1e-9)
        cos = reference_evaluate(loop_rerank(-(qn @ gn[cols].T), -(qn @ qn.T), -(gn[cols] @ gn[cols].T), 4, 2, 0.3),
                                 *args, max_rank=5)
        differs |= abs(cos["mAP"] - ref["mAP"]) > 1e-6
    assert differs  # the cosine inputs would be caught
