"""FusionReID end to end on synthetic data.

1. ``train.py --method fusionreid --dataset demo_market`` for one short epoch of a tiny model:
   last.pth, and test.py on it with the released protocol (Market rule, CMC to rank 50, the
   whole-vector-normalised concatenation of the six pre-BN features, squared Euclidean, camera
   ids passed to the model); the JSON names the descriptor, and its figures equal the per-query
   loop reference (tests/reference_eval.py) on the features test.py saved; every single-feature
   preset is accepted by name.
2. The trained tiny model's weights under their released names (the names of
   tests/golden/fusionreid/state_dict_keys.txt, ``module.`` prefixed, with the unused ViT ``fc``)
   go through ``tools/convert_official_checkpoint.py --method fusionreid`` and
   evaluates through test.py with the same figures as the original checkpoint.
3. FusionReID-VI (a project extension) trains on the SYSU-layout demo and every JSON it writes
   says so.
"""
import json
import os

import numpy as np
import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from model.fusionreid.convert import model_key
from reference_eval import reference_evaluate
from test_test_py import assert_trial_matches, script as test_script

TINY = ["MODEL.FUSIONREID.VIT_EMBED_DIM", "32", "MODEL.FUSIONREID.VIT_DEPTH", "1", "MODEL.FUSIONREID.VIT_NUM_HEADS",
        "2", "MODEL.FUSIONREID.MIX_DIM", "32", "MODEL.FUSIONREID.HTM_LAYER", "1", "MODEL.FUSIONREID.HTM_NUM_HEADS", "2",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.NUM_IDS", "4", "DATALOADER.NUM_POS", "2", "SOLVER.MAX_EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "1",
        "SOLVER.LOG_PERIOD", "1", "SOLVER.EVAL_BEFORE_TRAIN", "False", "TEST.NUM_WORKERS", "0",
        "TEST.BATCH_SIZE", "64", "DEVICE", "cpu"]
DEMO_MARKET = ["DATASET.DEMO_TRAIN_IDS", "6", "DATASET.DEMO_TEST_IDS", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch tiny FusionReID run on a small demo_market tree."""
    base = tmp_path_factory.mktemp("fusionreid_e2e")
    root, out = str(base / "demo_market"), str(base / "run")
    code = train.main(["--method", "fusionreid", "--dataset", "demo_market", "OUTPUT_DIR", out, "DATASET.ROOT", root,
                       *DEMO_MARKET, *TINY])
    assert code == 0
    return {"root": root, "run": out, "base": base}


def _test(ckpt, root, *extra):
    return test_script.main([str(a) for a in ("--method", "fusionreid", "--dataset", "demo_market", "--resume", ckpt,
                                              "DATASET.ROOT", root, *DEMO_MARKET, *TINY, *extra)])


def test_trained_checkpoint_evaluates_with_the_released_protocol(trained, tmp_path):
    feats, out = tmp_path / "feats", tmp_path / "res.json"
    record = _test(os.path.join(trained["run"], "last.pth"), trained["root"], "--save-features", feats,
                   "--output", out)
    with open(out) as f:
        saved = json.load(f)
    s = saved["settings"]
    assert (s["method"], s["method_label"], s["feature"], s["distance"], s["flip"], s["max_rank"]) == \
        ("fusionreid", "FusionReID", "concat6", "sqeuclidean", False, 50)
    assert s["embedding"] == {"model": "FusionReID", "preset": "concat6", "weights": [["concat6", 1.0]]}
    assert len(saved["mean"]["cmc"]) == 50 and saved["mean"]["mAP"] == record["mean"]["mAP"]
    with open(feats / "split.json") as f:
        meta = json.load(f)
    assert meta["protocol"] == "market" and "concat6" in meta["feature_sets"]
    q = np.load(feats / "query_concat6.npy").astype(np.float64)
    g = np.load(feats / "gallery_concat6.npy").astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    qp, qc = np.load(feats / "query_pids.npy"), np.load(feats / "query_camids.npy")
    gp, gc = np.load(feats / "gallery_pids.npy"), np.load(feats / "gallery_camids.npy")
    assert (gp == 0).any() and not (gp == -1).any()  # distractors kept, junk dropped
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    cols = meta["trials"][0]
    # the loop reference truncates each query's CMC to its kept gallery (about 40 items here) and
    # cannot stack ragged curves: compare the first 20 ranks
    ref = reference_evaluate(dist[:, cols], qp, gp[cols], qc, gc[cols], "market", max_rank=20, sort_kind="stable")
    assert_trial_matches(saved["per_trial"][0], ref)
    # the figures training logged for its last epoch are test.py's without the float64 distances
    logged = [r for r in read_metrics(os.path.join(trained["run"], "metrics.jsonl")) if r["split"] == "test"][-1]
    assert logged["method_label"] == "FusionReID"
    assert logged["mAP"] == pytest.approx(saved["mean"]["mAP"], abs=1e-4)


def test_camera_ids_reach_the_model_at_test_time(trained, tmp_path):
    """The camera embedding makes the features depend on the camera id passed with each image."""
    from model import load_model

    model = load_model(os.path.join(trained["run"], "last.pth")).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        a = model(x, None, torch.tensor([0, 1, 2]))["concat6"]
        b = model(x, None, torch.tensor([3, 4, 5]))["concat6"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pass camids"):
        model(x, None)


def test_the_descriptor_presets():
    from model.fusionreid.fusionreid import FusionReID

    heads = ["cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit"]
    assert set(FusionReID.embedding_presets) == {"concat6", "concat6_bn", "parts6", "parts6_bn", *heads,
                                                 *(h + "_bn" for h in heads)}
    assert FusionReID.default_embedding == "concat6"


@pytest.mark.parametrize("preset", ["htm_vit", "concat6_bn", "parts6"])
def test_descriptors_by_name(trained, tmp_path, preset):
    out = tmp_path / "res.json"
    _test(os.path.join(trained["run"], "last.pth"), trained["root"], "--feature", preset, "--output", out)
    with open(out) as f:
        settings = json.load(f)["settings"]
    assert settings["feature"] == preset
    assert [w[0] for w in settings["embedding"]["weights"]] == \
        (["cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit"] if preset == "parts6" else [preset])


def released_names(ours):
    """project key -> released key for every entry of `ours`: the released names listed in
    tests/golden/fusionreid/state_dict_keys.txt (the full model, whose names include the tiny
    model's) mapped through the converter's key map."""
    listing = os.path.join(os.path.dirname(__file__), "golden", "fusionreid", "state_dict_keys.txt")
    with open(listing) as f:
        names = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    inverse = {model_key(n): n for n in names if model_key(n) in ours}
    assert set(inverse) == set(ours), sorted(set(ours) - set(inverse))[:5]
    return inverse


def test_released_layout_checkpoint_converts_and_evaluates(trained, tmp_path):
    from tools.convert_official_checkpoint import main as convert_main

    ours = load_checkpoint(os.path.join(trained["run"], "last.pth"))["model"]
    released = {"module." + name: ours[key] for key, name in released_names(ours).items()}
    released["module.transformer.base.fc.weight"] = torch.zeros(1000, 32)  # unused; the converter drops it
    released["module.transformer.base.fc.bias"] = torch.zeros(1000)
    src, dst = tmp_path / "FusionReID_180.pth", tmp_path / "converted" / "best.pth"
    torch.save(released, src)
    convert_main([str(src), str(dst), "--method", "fusionreid", "--dataset", "demo_market", *DEMO_MARKET, *TINY])
    converted = load_checkpoint(str(dst))["model"]
    assert set(converted) == set(ours) and all(torch.equal(converted[k], ours[k]) for k in ours)
    a = _test(dst, trained["root"], "--output", tmp_path / "a.json")
    b = _test(os.path.join(trained["run"], "last.pth"), trained["root"], "--output", tmp_path / "b.json")
    assert a["mean"] == b["mean"]


def test_fusionreid_vi_is_labelled_a_project_extension(tiny_demo_root, tmp_path):
    out = str(tmp_path / "vi")
    code = train.main(["--method", "fusionreid_vi", "--dataset", "demo", "OUTPUT_DIR", out,
                       "DATASET.ROOT", tiny_demo_root, "DATASET.DEMO_TRAIN_IDS", "10", "DATASET.DEMO_TEST_IDS", "6",
                       "SOLVER.ITERS_PER_EPOCH", "0", *TINY])
    assert code == 0
    with open(os.path.join(out, "train.log")) as f:
        assert "FusionReID-VI (project extension)" in f.read()
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert records and all(r["method_label"] == "FusionReID-VI (project extension)" for r in records)
    res = tmp_path / "vi.json"
    test_script.main([str(a) for a in ("--method", "fusionreid_vi", "--dataset", "demo", "--resume",
                                        os.path.join(out, "last.pth"), "--output", res, "--num-trials", "1",
                                        "DATASET.ROOT", tiny_demo_root, "DATASET.DEMO_TRAIN_IDS", "10",
                                        "DATASET.DEMO_TEST_IDS", "6", *TINY)])
    with open(res) as f:
        assert json.load(f)["settings"]["method_label"] == "FusionReID-VI (project extension)"
