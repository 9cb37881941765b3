"""test.py end to end on tiny synthetic SYSU / RegDB / LLCM datasets and tiny checkpoints.

Independent expectations: the JSON figures are recomputed from the saved .npy features with
numpy (sum of the six inner products) and the per-query loop reference
(tests/reference_eval.py); the seeded gallery is re-drawn with the released rule
(random.seed(trial), random.choice over the sorted files of each (id, camera) folder).
"""
import importlib.util
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from reference_eval import reference_evaluate
from engine.checkpoint import file_sha256, make_checkpoint, save_checkpoint
from utils.config import build_config
from utils.errors import UserError

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = "[32, 16]"
FEATURE_SETS = ("pool_orig", "bn_orig", "pool_br1", "bn_br1", "pool_br2", "bn_br2")
COMMON = ["INPUT.SIZE_TEST", SIZE, "TEST.NUM_WORKERS", "0", "TEST.BATCH_SIZE", "512", "DEVICE", "cpu"]


def load_script():
    spec = importlib.util.spec_from_file_location("cmfn_test_script", os.path.join(ROOT, "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()


def tiny_checkpoint(path, name="cmfn", dataset="sysu"):
    from model import build_model

    cfg = build_config(dataset, opts=["MODEL.NAME", name, "MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False",
                                      "INPUT.SIZE_TEST", SIZE])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    save_checkpoint(str(path), make_checkpoint(model.state_dict(), cfg, 3, epoch=7))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from data.synthetic import write_llcm, write_regdb, write_sysu

    base = tmp_path_factory.mktemp("testpy")
    write_sysu(str(base / "sysu"), num_train=2, num_val=1, num_test=12, seed=0, images_per_cam=3)
    write_sysu(str(base / "sysu_small"), num_train=1, num_val=1, num_test=4, seed=1, images_per_cam=1)
    write_regdb(str(base / "regdb"), num_ids=6, seed=0, images_per_id=2)
    write_llcm(str(base / "llcm"), num_train=2, num_test=8, seed=0, images_per_cam=2)
    return {
        "base": base,
        "cmfn": tiny_checkpoint(base / "ckpt" / "cmfn.pth"),
        "baseline": tiny_checkpoint(base / "ckpt" / "baseline.pth", "baseline"),
        "baseline_regdb": tiny_checkpoint(base / "ckpt_regdb" / "baseline.pth", "baseline", "regdb"),
    }


def run(*argv):
    return script.main([str(a) for a in argv])


def stack(folder, side):
    with open(os.path.join(folder, "split.json")) as f:
        sets = json.load(f)["feature_sets"]
    return np.concatenate([np.load(os.path.join(folder, "%s_%s.npy" % (side, n))) for n in sets], 1).astype(np.float64)


def check_against_saved_features(record, folder, protocol, max_rank=20):
    """Every per-trial figure of the JSON equals the loop reference on the saved features."""
    with open(os.path.join(folder, "split.json")) as f:
        meta = json.load(f)
    q, g = stack(folder, "query"), stack(folder, "gallery")
    qp, qc = np.load(os.path.join(folder, "query_pids.npy")), np.load(os.path.join(folder, "query_camids.npy"))
    gp, gc = np.load(os.path.join(folder, "gallery_pids.npy")), np.load(os.path.join(folder, "gallery_camids.npy"))
    dist = -(q @ g.T)
    figures = []
    for cols in meta["trials"]:
        ref = reference_evaluate(dist[:, cols], qp, gp[cols], qc, gc[cols], protocol, max_rank=max_rank,
                                 sort_kind="stable")
        figures.append(ref)
    return meta, figures


def assert_trial_matches(got, ref):
    assert got["rank1"] == pytest.approx(float(ref["cmc"][0]), abs=1e-6)
    assert got["mAP"] == pytest.approx(float(ref["mAP"]), abs=1e-6)
    assert got["mINP"] == pytest.approx(float(ref["mINP"]), abs=1e-6)
    n = len(ref["cmc"])
    np.testing.assert_allclose(got["cmc"][:n], ref["cmc"], atol=1e-6)


def test_sysu_all_search_json_features_gallery_and_pictures(work, tmp_path):
    feats, out = tmp_path / "feats", tmp_path / "res.json"
    record = run("--dataset", "sysu", "--mode", "all", "--resume", work["cmfn"], "--num-trials", "3",
                 "--save-features", feats, "--output", out, "--visrank", "4", "--queries", "3",
                 "--plot-cmc", "--verbose", "DATASET.ROOT", work["base"] / "sysu", "TEST.MAX_RANK", "5", *COMMON)
    with open(out) as f:
        saved = json.load(f)
    assert saved["mean"]["mAP"] == pytest.approx(record["mean"]["mAP"])
    s = saved["settings"]
    assert (s["dataset"], s["mode"], s["direction"], s["gallery"], s["shots"], s["feature"], s["flip"],
            s["flip_mode"], s["distance"], s["rerank"], s["image_size"]) == \
        ("sysu", "all", "ir2vis", "seeded", 1, "sum6", True, "sum", "cosine", False, [32, 16])
    assert saved["checkpoints"][0]["sha256"] == file_sha256(work["cmfn"])
    assert saved["checkpoints"][0]["epoch"] == 7
    assert len(saved["per_trial"]) == 3

    # figures == loop reference on the saved features (sum of six inner products)
    meta, refs = check_against_saved_features(saved, feats, "sysu", max_rank=5)
    assert meta["feature_sets"] == list(FEATURE_SETS)
    for got, ref in zip(saved["per_trial"], refs):
        assert_trial_matches(got, ref)
    for key in ("rank1", "mAP", "mINP"):
        values = [t[key] for t in saved["per_trial"]]
        assert saved["mean"][key] == pytest.approx(np.mean(values), abs=1e-9)
        assert saved["std"][key] == pytest.approx(np.std(values), abs=1e-9)

    # the seeded gallery of trial t is the released draw: random.seed(t); one random.choice over
    # the sorted files of each (id, camera), ids sorted, cameras 1, 2, 4, 5
    root = str(work["base"] / "sysu")
    with open(os.path.join(root, "exp", "test_id.txt")) as f:
        ids = sorted(int(x) for x in f.readline().split(","))
    for t, cols in enumerate(meta["trials"]):
        random.seed(t)
        expected = []
        for pid in ids:
            for cam in (1, 2, 4, 5):
                folder = os.path.join(root, "cam%d" % cam, "%04d" % pid)
                if os.path.isdir(folder):
                    expected.append(os.path.join(folder, random.choice(sorted(os.listdir(folder)))))
        got = [meta["gallery_paths"][i] for i in cols]
        assert [os.path.normpath(p) for p in got] == [os.path.normpath(p) for p in expected]
    # queries: every IR image (cams 3 and 6) of the test ids
    assert {int(p.split(os.sep)[-3][3:]) for p in meta["query_paths"]} == {3, 6}

    # pictures
    assert os.path.isfile(tmp_path / "res_cmc.png")
    assert os.listdir(tmp_path / "res_ranks") == ["ranks_top4_page01.png"]


def test_sysu_indoor_official_multishot_mix_flip_mean(work, tmp_path):
    feats = tmp_path / "f"
    record = run("--dataset", "sysu", "--mode", "indoor", "--gallery", "official", "--shots", "10",
                 "--num-trials", "2", "--feature", "mix", "--flip-mode", "mean", "--resume", work["baseline"],
                 "--save-features", feats, "DATASET.ROOT", work["base"] / "sysu", "TEST.MAX_RANK", "3", *COMMON)
    s = record["settings"]
    assert (s["mode"], s["gallery"], s["shots"], s["feature"], s["flip"], s["flip_mode"]) == \
        ("indoor", "official", 10, "mix", True, "mean")
    # default output next to the checkpoint, named after the protocol and the non-default choices
    assert os.path.isfile(os.path.join(os.path.dirname(work["baseline"]),
                                       "test_sysu_indoor_official_10shot_mix_flipmean.json"))
    with open(feats / "split.json") as f:
        meta = json.load(f)
    assert meta["feature_sets"] == ["pool_orig", "bn_orig"]  # the baseline's two sets
    assert {int(p.split(os.sep)[-3][3:]) for p in meta["gallery_paths"]} <= {1, 2}
    # the official multi-shot gallery: the first 10 (here: all) numbers of row t of each
    # (camera, id) permutation in exp/rand_perm_cam.mat
    from scipy.io import loadmat

    cells = loadmat(str(work["base"] / "sysu" / "exp" / "rand_perm_cam.mat"))["rand_perm_cam"]
    for t, cols in enumerate(meta["trials"]):
        got = sorted(os.path.relpath(meta["gallery_paths"][i], str(work["base"] / "sysu")) for i in cols)
        expected = []
        for path in got:
            cam, pid = int(path.split(os.sep)[0][3:]), int(path.split(os.sep)[1])
            perm = np.atleast_2d(cells[cam - 1][0][pid - 1, 0])
            expected.append(sorted(os.path.join("cam%d" % cam, "%04d" % pid, "%04d.jpg" % n)
                                   for n in perm[t][:10].astype(int)))
        assert all(p in e for p, e in zip(got, expected))
        assert len(got) == len({p for e in expected for p in e})
    # the figures: mix = 0.1 pool + 0.9 BN similarities of the (flip-averaged) saved features
    q = {n: np.load(feats / ("query_%s.npy" % n)).astype(np.float64) for n in meta["feature_sets"]}
    g = {n: np.load(feats / ("gallery_%s.npy" % n)).astype(np.float64) for n in meta["feature_sets"]}
    norms = np.linalg.norm(q["bn_orig"], axis=1)
    assert np.all(norms <= 1 + 1e-5) and np.all(norms > 0.5)  # mean of two unit vectors
    sim = 0.1 * q["pool_orig"] @ g["pool_orig"].T + 0.9 * q["bn_orig"] @ g["bn_orig"].T
    qp, qc = np.load(feats / "query_pids.npy"), np.load(feats / "query_camids.npy")
    gp, gc = np.load(feats / "gallery_pids.npy"), np.load(feats / "gallery_camids.npy")
    for t, cols in enumerate(meta["trials"]):
        ref = reference_evaluate(-sim[:, cols], qp, gp[cols], qc, gc[cols], "sysu", max_rank=3, sort_kind="stable")
        assert_trial_matches(record["per_trial"][t], ref)


def test_regdb_trial_all_ten_checkpoints(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for t in range(1, 11):
        os.makedirs(tmp_path / "runs" / ("regdb_trial%d" % t))
        shutil.copy(work["baseline_regdb"], tmp_path / "runs" / ("regdb_trial%d" % t) / "best.pth")
    record = run("--dataset", "regdb", "--trial", "all", "--direction", "ir2vis", "--save-features", "feats",
                 "DATASET.ROOT", work["base"] / "regdb", "TEST.FLIP", "False", *COMMON)
    assert [r["trial"] for r in record["per_trial"]] == list(range(1, 11))
    assert [c["trial"] for c in record["checkpoints"]] == list(range(1, 11))
    assert record["checkpoints"][3]["path"] == str(tmp_path / "runs" / "regdb_trial4" / "best.pth")
    assert os.path.isfile(tmp_path / "runs" / "test_regdb_ir2vis_trials_noflip.json")
    for t in (1, 10):
        folder = tmp_path / "feats" / ("trial%d" % t)
        meta, refs = check_against_saved_features(record, folder, "regdb")
        assert meta["feature_sets"] == ["pool_orig", "bn_orig"]
        assert meta["info"]["trial"] == t and meta["query_modality"] == "infrared"
        assert_trial_matches(record["per_trial"][t - 1], refs[0])
    assert record["mean"]["mAP"] == pytest.approx(np.mean([r["mAP"] for r in record["per_trial"]]))

    # a --resume pattern works too; a missing trial checkpoint is an error naming the file
    os.remove(tmp_path / "runs" / "regdb_trial7" / "best.pth")
    with pytest.raises(script.TestError, match=r"regdb_trial7[/\\]best\.pth"):
        run("--dataset", "regdb", "--trial", "all", "DATASET.ROOT", work["base"] / "regdb", *COMMON)
    with pytest.raises(script.TestError, match="needs one checkpoint per trial"):
        run("--dataset", "regdb", "--trial", "all", "--resume", work["baseline_regdb"], *COMMON)
    one = run("--dataset", "regdb", "--trial", "3", "--direction", "ir2vis",
              "--resume", "runs/regdb_trial{trial}/best.pth",
              "--output", "one.json", "DATASET.ROOT", work["base"] / "regdb", "TEST.FLIP", "False", *COMMON)
    assert one["per_trial"][0]["trial"] == 3
    assert one["per_trial"][0]["mAP"] == pytest.approx(record["per_trial"][2]["mAP"], abs=1e-6)


@pytest.mark.parametrize("direction", ["ir2vis", "vis2ir"])
def test_llcm_directions(work, tmp_path, direction):
    feats = tmp_path / "f"
    record = run("--dataset", "llcm", "--direction", direction, "--resume", work["baseline"], "--num-trials", "2",
                 "--no-flip", "--save-features", feats, "--output", tmp_path / "r.json",
                 "DATASET.ROOT", work["base"] / "llcm", "TEST.MAX_RANK", "3", *COMMON)
    with open(feats / "split.json") as f:
        meta = json.load(f)
    query_folder = "test_nir" if direction == "ir2vis" else "test_vis"
    assert all(os.sep + query_folder + os.sep in p for p in meta["query_paths"])
    _, refs = check_against_saved_features(record, feats, "llcm", max_rank=3)
    for got, ref in zip(record["per_trial"], refs):
        assert_trial_matches(got, ref)


def test_option_errors(work, tmp_path):
    root = ["DATASET.ROOT", work["base"] / "sysu", *COMMON]
    with pytest.raises(UserError, match="--resume CHECKPOINT is required"):
        run("--dataset", "sysu", *root)
    with pytest.raises(UserError, match="checkpoint not found: .*nothing.pth"):
        run("--dataset", "sysu", "--resume", tmp_path / "nothing.pth", *root)
    with pytest.raises(UserError, match="--trial applies to RegDB"):
        run("--dataset", "sysu", "--trial", "2", "--resume", work["cmfn"], *root)
    with pytest.raises(UserError, match="DATASET.TRIAL"):
        run("--dataset", "regdb", "--trial", "x", "--resume", work["cmfn"], *root)
    with pytest.raises(UserError, match="1..10"):
        run("--dataset", "regdb", "--trial", "11", "--resume", work["cmfn"], *root)
    with pytest.raises(UserError, match="TEST.FEATURE 'nope' is not an embedding of the Baseline model"):
        run("--dataset", "sysu", "--resume", work["baseline"], "--feature", "nope", *root)
    with pytest.raises(UserError, match="TEST.NOPE"):
        run("--dataset", "sysu", "--resume", work["cmfn"], "TEST.NOPE", "1")
    with pytest.raises(UserError, match="DEVICE"):
        run("--dataset", "sysu", "--resume", work["cmfn"], *root, "DEVICE", "gpu0")
    # --trial all with a pattern: every missing file is named before anything is evaluated
    for t in (1, 2, 3):
        shutil.copy(work["cmfn"], tmp_path / ("ck%d.pth" % t))
    with pytest.raises(UserError, match=r"ck4\.pth \(and 6 more: .*ck10\.pth\)"):
        run("--dataset", "regdb", "--trial", "all", "--resume", tmp_path / "ck{trial}.pth", *root)
    with pytest.raises(UserError, match="OUTPUT_DIR is set"):
        run("--dataset", "regdb", "--trial", "all", "OUTPUT_DIR", tmp_path / "one", *root)
    with pytest.raises(UserError, match="no per-trial checkpoints"):
        run("--dataset", "sysu", "--resume", tmp_path / "ck{trial}.pth", *root)


def test_converted_released_checkpoint_evaluates(work, tmp_path):
    """A fake checkpoint of the released code (every key and shape, plausible random values),
    converted by tools/convert_official_checkpoint.py, runs through test.py."""
    from test_convert_checkpoint import haar_bank, read_layout, swin_index
    from tools.convert_official_checkpoint import convert

    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, dims, _ in read_layout("sysu"):
        if key.endswith("filter"):
            value = haar_bank(dims[0])
        elif key.endswith("relative_position_index"):
            value = swin_index(int(round(dims[0] ** 0.5)))
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith("running_var"):
            value = torch.ones(dims)
        elif key.endswith("running_mean"):
            value = torch.zeros(dims)
        elif len(dims) >= 2:
            fan_in = int(np.prod(dims[1:]))
            value = torch.randn(dims, generator=gen) / fan_in ** 0.5
        elif key.endswith("bias"):
            value = 0.01 * torch.randn(dims, generator=gen)
        else:
            # norm scales 0.2 keep the activations of this untrained 50-layer network finite
            # (the non-local products overflow otherwise); a trained network's are bounded
            value = (0.2 if key.endswith("weight") else 1.0) * (1 + 0.1 * torch.randn(dims, generator=gen))
        state[key] = value
    src, dst = tmp_path / "sysu_deen_best.t", tmp_path / "converted" / "best.pth"
    torch.save({"net": state, "epoch": 99}, src)
    convert(str(src), str(dst), "sysu", log=lambda line: None)
    record = run("--dataset", "sysu", "--resume", dst, "--num-trials", "1", "--no-flip",
                 "DATASET.ROOT", work["base"] / "sysu_small", "TEST.MAX_RANK", "3", *COMMON)
    assert record["checkpoints"][0]["backbone"] == "resnet50"
    assert 0 <= record["mean"]["rank1"] <= 1 and np.isfinite(record["mean"]["mAP"])
    assert os.path.isfile(tmp_path / "converted" / "test_sysu_all_seeded_1shot_noflip.json")


def test_visualize_ranks_tool_from_checkpoint(work, tmp_path):
    from tools.visualize_ranks import main as visualize_main

    visualize_main(["--resume", work["baseline"], "-k", "3", "--queries", "0,5", "--plot-cmc", "--out", str(tmp_path),
                    "--dataset", "sysu", "--num-trials", "1", "DATASET.ROOT", str(work["base"] / "sysu"), *COMMON])
    assert sorted(os.listdir(tmp_path)) == ["test.json", "test_cmc.png", "test_ranks"]
    assert os.listdir(tmp_path / "test_ranks") == ["ranks_top3_page01.png"]


def test_non_finite_features_name_the_checkpoint(work, tmp_path):
    ckpt = torch.load(work["baseline"], weights_only=True)
    ckpt["model"]["head.bnneck.running_var"].fill_(float("nan"))
    bad = tmp_path / "bad.pth"
    save_checkpoint(str(bad), ckpt)
    with pytest.raises(script.TestError, match=r"bad\.pth: \d+ query images have non-finite bn_orig features"):
        run("--dataset", "sysu", "--resume", bad, "--num-trials", "1", "--no-flip",
            "DATASET.ROOT", work["base"] / "sysu", *COMMON)


def released_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking as the re-ranking authors' released numpy code computes it, in
    float64: it takes Euclidean distances, squares them, divides each row by its largest
    value, and expands R(p, k1) by a candidate's R(g, round(k1/2)) when their intersection has
    more than 2/3 of the candidate set's members."""
    original = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0) ** 2
    original = np.transpose(original / np.max(original, axis=0))
    nq, n = q_g.shape[0], original.shape[0]
    V = np.zeros((n, n))
    initial_rank = np.argsort(original, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for candidate in recip:
            c_forward = initial_rank[candidate, :half + 1]
            c_backward = initial_rank[c_forward, :half + 1]
            c_recip = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original = original[:nq]
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2]], axis=0) for i in range(n)])
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(n)]
    jaccard = np.zeros_like(original)
    for i in range(nq):
        temp_min = np.zeros(n)
        nonzero = np.where(V[i] != 0)[0]
        for j in nonzero:
            temp_min[inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return (jaccard * (1 - lambda_value) + original * lambda_value)[:, nq:]


def test_rerank_squared_euclidean_float64_against_released_numpy(work, tmp_path):
    """test.py --rerank with the defaults (cosine ranking, flip-summed features of norms up to
    2): every trial equals the released re-ranking of the Euclidean distances of the saved
    features (the six sets concatenated), and the JSON records the float64 distances."""
    feats, out = tmp_path / "feats", tmp_path / "rr.json"
    run("--dataset", "sysu", "--resume", work["cmfn"], "--num-trials", "2", "--rerank",
        "--save-features", feats, "--output", out, "DATASET.ROOT", work["base"] / "sysu",
        "TEST.MAX_RANK", "5", *COMMON)
    with open(out) as f:
        saved = json.load(f)
    s = saved["settings"]
    assert s["distance"] == "cosine" and s["distance_dtype"] == "float64"
    assert s["rerank"] == {"k1": 20, "k2": 6, "lambda": 0.3, "expansion": "released", "distance": "sqeuclidean"}
    with open(feats / "split.json") as f:
        meta = json.load(f)
    assert meta["settings"]["distance_dtype"] == "float64"
    q, g = stack(feats, "query"), stack(feats, "gallery")
    norms = np.linalg.norm(np.load(feats / "query_bn_orig.npy").astype(np.float64), axis=1)
    assert norms.max() > 1.5 and norms.max() <= 2 + 1e-5  # flip-summed: not unit norm
    euclid = lambda a, b: np.sqrt(np.maximum(  # noqa: E731
        (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))
    qp, qc = np.load(feats / "query_pids.npy"), np.load(feats / "query_camids.npy")
    gp, gc = np.load(feats / "gallery_pids.npy"), np.load(feats / "gallery_camids.npy")
    for t, cols in enumerate(meta["trials"]):
        gt = g[cols]
        d = released_rerank(euclid(q, gt), euclid(q, q), euclid(gt, gt))
        ref = reference_evaluate(d, qp, gp[cols], qc, gc[cols], "sysu", max_rank=5, sort_kind="stable")
        assert_trial_matches(saved["per_trial"][t], ref)
    # without --rerank the JSON records float64 distances and no re-ranking
    plain = run("--dataset", "sysu", "--resume", work["cmfn"], "--num-trials", "1", "--output", tmp_path / "p.json",
                "DATASET.ROOT", work["base"] / "sysu", "TEST.MAX_RANK", "5", *COMMON)
    assert plain["settings"]["distance_dtype"] == "float64" and plain["settings"]["rerank"] is False
    single = run("--dataset", "sysu", "--resume", work["cmfn"], "--num-trials", "1", "--output", tmp_path / "s.json",
                 "DATASET.ROOT", work["base"] / "sysu", "TEST.MAX_RANK", "5", "TEST.DISTANCE_DTYPE", "float32",
                 *COMMON)
    assert single["settings"]["distance_dtype"] == "float32"
