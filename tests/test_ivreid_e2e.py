"""IV-REID end to end: a saved model of the reference code converted and evaluated by test.py,
and a tiny train.py run whose checkpoint test.py evaluates.

1. tests/golden/ivreid/checkpoint_skeleton_sysu.pth is ``torch.save(model)`` of a reference
   Baseline (395 identities) with constant tensors; a network of constant weights overflows
   (test.py refuses its non-finite features, checked here too), so the skeleton is re-saved with the
   weights of the README rule (tests/ivreid_golden.py), keeping every pickled global of the
   original (the reference's own class names). That file goes through
   ``tools/convert_official_checkpoint.py SRC DST --method ivreid --dataset sysu`` and test.py
   on a tiny synthetic SYSU-MM01 tree: the JSON must state the released protocol (post-BN
   feature, squared Euclidean distance, 10 camera-major galleries seeded 2019 + 33 i) and
   every per-trial figure must equal the per-query loop reference (tests/reference_eval.py)
   on the features test.py saved, with galleries re-drawn by the released walk.
2. ``train.py --method ivreid --dataset demo`` for one epoch of a tiny demo (ResNet-18,
   64x32) writes last.pth and the test records of metrics.jsonl; test.py evaluates last.pth
   with the figures training logged for the same gallery trial.
"""
import io
import json
import os
import pickletools
import random
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import train
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from ivreid_golden import GOLDEN, rule_tensor
from model.ivreid_convert import ReferenceModule, load_reference_state_dict, project_key, restricted_pickle
from reference_eval import reference_evaluate
from test_test_py import assert_trial_matches, script as test_script  # test.py, loaded from its file
from tools.convert_official_checkpoint import main as convert_main

SKELETON = GOLDEN / "checkpoint_skeleton_sysu.pth"
RELEASED_SEEDS = [2019 + 33 * i for i in range(10)]
# The loop reference's distinct-identity CMC needs max_rank <= the identities of the tiny tree.
MAX_RANK = 5
COMMON = ["INPUT.SIZE_TEST", "[32, 16]", "TEST.NUM_WORKERS", "0", "TEST.BATCH_SIZE", "512", "DEVICE", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def keep_random_state():
    state = random.getstate()
    yield
    random.setstate(state)


# --- a reference-format file with finite weights ------------------------------------------

def pickled_globals(path):
    """The (module, name) pairs a torch zip checkpoint's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    found = set()
    strings = []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
    return found


REFERENCE_CLASSES = {"Baseline": "model.baseline", "ResNet": "model.resnet", "Bottleneck": "model.resnet"}


def resave_with_rule_weights(src, dst, monkeypatch):
    """`src` (a pickled reference model) re-saved to `dst` with every tensor replaced by its
    rule value, its modules pickled under the reference's class names again."""
    with open(src, "rb") as f:
        model = torch.load(f, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        for name, value in list(module._parameters.items()):
            module._parameters[name] = nn.Parameter(rule_tensor(prefix + name, tuple(value.shape)),
                                                    requires_grad=value.requires_grad)
        for name, value in list(module._buffers.items()):
            module._buffers[name] = rule_tensor(prefix + name, tuple(value.shape))
    with monkeypatch.context() as patch:
        # classes of the reference's names in modules of the reference's names, for pickle only
        modules = {}
        for name, module_name in REFERENCE_CLASSES.items():
            if module_name not in modules:
                modules[module_name] = types.ModuleType(module_name)
                patch.setitem(sys.modules, module_name, modules[module_name])
            setattr(modules[module_name], name, type(name, (nn.Module,), {"__module__": module_name}))
        for module in model.modules():
            if isinstance(module, ReferenceModule):
                name = type(module).__name__
                module.__class__ = getattr(modules[REFERENCE_CLASSES[name]], name)
        torch.save(model, dst)


def released_cam_major_gallery(root, seed, cams=(1, 2, 4, 5)):
    """The released single-shot gallery: random.seed(seed), then camera by camera, id by id
    (sorted), one random.choice over the sorted files of each (camera, id) folder."""
    with open(os.path.join(root, "exp", "test_id.txt")) as f:
        ids = sorted(int(x) for x in f.read().splitlines()[0].split(","))
    random.seed(seed)
    chosen = []
    for cam in cams:
        for pid in ids:
            folder = os.path.join(root, "cam%d" % cam, "%04d" % pid)
            if os.path.isdir(folder):
                chosen.append(os.path.join(folder, random.choice(sorted(os.listdir(folder)))))
    return chosen


def test_converted_reference_checkpoint_evaluates(synthetic_root, tmp_path, monkeypatch, keep_random_state):
    src = tmp_path / "sysu_best.pth"
    resave_with_rule_weights(str(SKELETON), str(src), monkeypatch)
    # the released format: the same pickled globals as the skeleton, the same keys and shapes
    assert pickled_globals(src) == pickled_globals(SKELETON)
    assert ("model.baseline", "Baseline") in pickled_globals(src)
    skeleton, reference = load_reference_state_dict(str(SKELETON)), load_reference_state_dict(str(src))
    assert [(k, v.shape) for k, v in reference.items()] == [(k, v.shape) for k, v in skeleton.items()]
    for key, value in reference.items():
        assert torch.equal(value, rule_tensor(key, tuple(value.shape))), key

    dst = tmp_path / "converted" / "best.pth"
    convert_main([str(src), str(dst), "--method", "ivreid", "--dataset", "sysu"])
    converted = load_checkpoint(str(dst))["model"]
    for key, value in reference.items():
        assert torch.equal(converted[project_key(key)], value), key

    root = synthetic_root("sysu")
    feats, out = tmp_path / "feats", tmp_path / "result.json"
    record = test_script.main([str(a) for a in (
        "--method", "ivreid", "--dataset", "sysu", "--resume", dst, "--save-features", feats, "--output", out,
        "DATASET.ROOT", root, "TEST.MAX_RANK", MAX_RANK, *COMMON)])
    with open(out) as f:
        saved = json.load(f)
    assert saved["mean"]["mAP"] == record["mean"]["mAP"] and saved["mean"]["cmc"] == record["mean"]["cmc"]
    s = saved["settings"]
    assert (s["method"], s["dataset"], s["mode"], s["direction"], s["gallery"], s["shots"], s["num_trials"],
            s["trial_seeds"], s["feature"], s["distance"], s["flip"], s["rerank"], s["image_size"], s["max_rank"]) == \
        ("ivreid", "sysu", "all", "ir2vis", "seeded_cam_major", 1, 10, RELEASED_SEEDS, "bn", "sqeuclidean", False,
         False, [32, 16], MAX_RANK)
    assert s["embedding"] == {"model": "IVReID", "preset": "bn", "weights": [["bn", 1.0]]}
    assert saved["checkpoints"][0]["model"] == "ivreid" and saved["checkpoints"][0]["backbone"] == "resnet50"
    assert len(saved["per_trial"]) == 10

    with open(feats / "split.json") as f:
        meta = json.load(f)
    # both embedding sets are saved; the ranking must use the post-BN one
    assert meta["feature_sets"] == ["bn", "pool"] and meta["protocol"] == "sysu"
    q = np.load(feats / "query_bn.npy").astype(np.float64)
    g = np.load(feats / "gallery_bn.npy").astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    qp, qc = np.load(feats / "query_pids.npy"), np.load(feats / "query_camids.npy")
    gp, gc = np.load(feats / "gallery_pids.npy"), np.load(feats / "gallery_camids.npy")
    # queries: every infrared image (cameras 3 and 6) of the test ids
    assert {int(p.split(os.sep)[-3][3:]) for p in meta["query_paths"]} == {3, 6}
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    assert dist.std() > 1e-3  # distinct features: the ranking is not decided by ties
    assert len(meta["trials"]) == 10
    for seed, cols, got in zip(RELEASED_SEEDS, meta["trials"], saved["per_trial"]):
        gallery = [meta["gallery_paths"][i] for i in cols]
        assert [os.path.normpath(p) for p in gallery] == \
            [os.path.normpath(p) for p in released_cam_major_gallery(root, seed)]
        assert_trial_matches(got, reference_evaluate(dist[:, cols], qp, gp[cols], qc, gc[cols], "sysu",
                                                     max_rank=MAX_RANK, sort_kind="stable"))
    for key in ("rank1", "mAP", "mINP"):
        assert saved["mean"][key] == pytest.approx(np.mean([t[key] for t in saved["per_trial"]]), abs=1e-9)
    # the comparison tells the two saved sets apart: the pre-BN feature ranks differently
    q_pool, g_pool = (np.load(feats / ("%s_pool.npy" % side)).astype(np.float64) for side in ("query", "gallery"))
    pool_dist = ((q_pool[:, None, :] - g_pool[None, :, :]) ** 2).sum(-1)
    pool_map = [reference_evaluate(pool_dist[:, cols], qp, gp[cols], qc, gc[cols], "sysu", max_rank=MAX_RANK,
                                   sort_kind="stable")["mAP"] for cols in meta["trials"]]
    assert not np.allclose(pool_map, [t["mAP"] for t in saved["per_trial"]], atol=1e-6)


def test_constant_skeleton_is_refused_for_its_non_finite_features(synthetic_root, tmp_path):
    # every weight of the skeleton is its key index: the activations overflow
    dst = tmp_path / "skeleton" / "best.pth"
    convert_main([str(SKELETON), str(dst), "--method", "ivreid", "--dataset", "sysu"])
    with pytest.raises(test_script.TestError, match=r"best\.pth: \d+ query images have non-finite bn features"):
        test_script.main([str(a) for a in ("--method", "ivreid", "--dataset", "sysu", "--resume", dst,
                                            "--num-trials", "1", "TEST.TRIAL_SEEDS", "[2019]",
                                            "DATASET.ROOT", synthetic_root("sysu"), *COMMON)])


DEMO = ["DATASET.DEMO_TRAIN_IDS", "10", "DATASET.DEMO_TEST_IDS", "6", "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]"]


def test_tiny_demo_training_and_its_checkpoint(tmp_path):
    data, out = str(tmp_path / "demo"), str(tmp_path / "run")
    assert train.main(["--method", "ivreid", "--dataset", "demo", "OUTPUT_DIR", out, "DATASET.ROOT", data, *DEMO,
                       "MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False", "DATALOADER.NUM_IDS", "4",
                       "DATALOADER.NUM_POS", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_EPOCHS", "1"]) == 0
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pth"} <= set(os.listdir(out))
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    # the demo preset evaluates the untrained model too; the last epoch is always evaluated
    assert [(r["epoch"], r["split"], r["feature"], r["flip"]) for r in records] == \
        [(-1, "test", "bn", False), (0, "test", "bn", False)]
    for r in records:
        assert 0 <= r["rank1"] <= 1 and 0 < r["mAP"] <= 1 and r["gallery_trial"] == 0
    last = load_checkpoint(os.path.join(out, "last.pth"))
    assert last["epoch"] == 0
    assert any(k.startswith("aux_visible.") for k in last["model"])  # saved whole, trainable further

    record = test_script.main(["--method", "ivreid", "--dataset", "demo", "--resume", os.path.join(out, "last.pth"),
                               "--output", str(tmp_path / "test.json"), "DATASET.ROOT", data, *DEMO,
                               "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"])
    s = record["settings"]
    assert (s["method"], s["dataset"], s["feature"], s["distance"], s["flip"], s["num_trials"]) == \
        ("ivreid", "demo", "bn", "sqeuclidean", False, 2)
    assert len(record["per_trial"]) == 2
    assert record["checkpoints"][0]["model"] == "ivreid" and record["checkpoints"][0]["backbone"] == "resnet18"
    # trial 0 is the gallery training evaluated: the same figures for the same weights
    final = records[-1]
    for key in ("rank1", "mAP", "mINP"):
        assert record["per_trial"][0][key] == pytest.approx(final[key], abs=1e-9), key
