"""train_usl.py end to end on the tiny synthetic SYSU-layout demo tree (CPU, one thread,
DETERMINISTIC, a tiny encoder, two iterations per epoch), and test.py on its checkpoints and
on converted released-layout checkpoints.

* the reference run goes through every stage in order (stage 1, the six camera-local runs,
  stage 2), writes each stage's files and one monitoring and evaluation record per epoch;
* a run stopped by SIGTERM inside a camera-local run, resumed, stopped again inside stage 2
  and resumed ends bitwise identical to the reference (weights, optimiser state, memories of
  the last checkpoint, every selected model, metrics.jsonl); so does a run stopped between
  two stages;
* shuffling and erasing the training identities changes the monitoring figures and nothing
  else: the weights are bitwise the reference's;
* bad input gives one clear error;
* test.py evaluates the run's best.pth with the figures of the in-training evaluation, and a
  converted released TokenMatcher checkpoint (SYSU and RegDB layouts) with the released
  protocol (flip average of the raw descriptors, then L2).
"""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data.pseudo
import engine.usl.epoch as usl_epoch
import test as test_py
import train
import train_usl
from data.pseudo import ModalityListing
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from model import load_model
from model.tokenmatcher.encoder import TokenMatcherEncoder, flip_average
from tools.convert_official_checkpoint import main as convert_main
from utils.errors import ConfigError

STAGES = ["stage1", "cam2", "cam5", "cam0", "cam1", "cam3", "cam4", "stage2"]
TINY = {
    "DATASET.DEMO_TRAIN_IDS": 10, "DATASET.DEMO_TEST_IDS": 6,
    "MODEL.TOKENMATCHER.EMBED_DIM": 32, "MODEL.TOKENMATCHER.DEPTH": 2, "MODEL.TOKENMATCHER.NUM_HEADS": 2,
    "MODEL.TOKENMATCHER.STEM_WIDTH": 8, "MODEL.TOKENMATCHER.PATCH_SIZE": 16, "MODEL.TOKENMATCHER.NUM_TOKENS": 2,
    "MODEL.TOKENMATCHER.GHOST_BATCHES": 2, "USL.DTNL_VOTES": 2,
    "USL.BATCH_SIZE": 4, "USL.NUM_INSTANCES": 2, "USL.CLUSTER.K1": 6, "USL.CLUSTER.K2": 2, "USL.CLUSTER.EPS": 0.6,
    "USL.CAMERA.EPS": "[0.6,0.6,0.6,0.6,0.6,0.6]", "USL.MATCH_CAPACITY": 3,
    "USL.STAGE1.EPOCHS": 2, "USL.STAGE1.ITERS": 2, "USL.STAGE2.EPOCHS": 2, "USL.STAGE2.ITERS": 2,
    "USL.CAMERA.EPOCHS_IR": 1, "USL.CAMERA.EPOCHS_RGB": 1, "USL.CAMERA.ITERS": 2, "USL.EVAL_START": 1,
    "TEST.NUM_TRIALS": 1, "SOLVER.EVAL_BEFORE_TRAIN": False, "SOLVER.SELECT_BY": "test",
}


def usl_opts(root, out, **extra):
    opts = dict(TINY, **{"DATASET.ROOT": root, "OUTPUT_DIR": out})
    opts.update(extra)
    return ["--dataset", "demo"] + [str(x) for kv in opts.items() for x in kv]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_demo_root, one_thread):
    out = str(tmp_path_factory.mktemp("usl_ref") / "run")
    assert train_usl.main(usl_opts(tiny_demo_root, out)) == 0
    return out


class SignalAtCall:
    """Sends SIGTERM to this process during the `at`-th call of `inner`."""

    def __init__(self, inner, at, method=False):
        self.inner, self.at, self.calls, self.method = inner, at, 0, method

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(*args, **kwargs)

    def __get__(self, obj, owner):  # bound like a method when patched onto a class
        return (lambda *a, **k: self(obj, *a, **k)) if self.method and obj is not None else self


def _checkpoints_equal(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["epoch"] == b["epoch"] and a.get("iteration") == b.get("iteration")
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, "%s: weights differ: %s" % (os.path.basename(a_path), differing[:5])
    return a, b


def assert_same_run(run_a, run_b):
    a, b = _checkpoints_equal(os.path.join(run_a, "last.pth"), os.path.join(run_b, "last.pth"))
    assert a["global_step"] == b["global_step"] and a["usl"]["stage"] == b["usl"]["stage"] == "stage2"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, state in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][k]))
                   for k, v in state.items())
    assert a["usl"]["best"] == b["usl"]["best"]
    for cam, part in a["usl"]["camera_local"].items():
        assert torch.equal(part["labels"], b["usl"]["camera_local"][cam]["labels"])
    for name in ("stage1_best.pth", "stage2_best.pth", "best.pth"):
        _checkpoints_equal(os.path.join(run_a, name), os.path.join(run_b, name))
    assert read_metrics(os.path.join(run_a, "metrics.jsonl")) == read_metrics(os.path.join(run_b, "metrics.jsonl"))


def test_reference_run_goes_through_every_stage(reference):
    names = set(os.listdir(reference))
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pth", "best.pth", "stage1_best.pth",
            "stage2_best.pth"} <= names
    assert {"camera_local_%d.pth" % c for c in range(6)} <= names
    records = read_metrics(os.path.join(reference, "metrics.jsonl"))
    clusters = [(r["stage"], r["epoch"]) for r in records if r["kind"] == "clusters"]
    assert clusters == [("stage1", 0), ("stage1", 1)] + [(s, 0) for s in STAGES[1:7]] + [("stage2", 0), ("stage2", 1)]
    for r in records:
        if r["kind"] != "clusters":
            continue
        assert r["monitoring_only"] is True
        for group in ("camera",) if r["stage"].startswith("cam") else ("rgb", "ir"):
            s = r[group]
            assert s["clusters"] > 0 and 0 <= s["outliers"] < s["images"]
            assert 0 <= s["nmi"] <= 1 and 0 < s["purity"] <= 1
        if r["stage"] == "stage2":
            m = r["match"]
            assert m["rgb_clusters"] == r["rgb"]["clusters"] and m["ir_clusters"] == r["ir"]["clusters"]
            assert r["neighbours"]["mean_ir"] >= 1  # an image is its own neighbour
    evals = [(r["stage"], r["epoch"], r["split"]) for r in records if r["kind"] == "eval"]
    assert evals == [("stage1", 1, "test"), ("stage2", 1, "test")]
    last = load_checkpoint(os.path.join(reference, "last.pth"))
    assert last["usl"]["plan"] == STAGES and last["usl"]["stage"] == "stage2" and last["epoch"] == 1
    assert last["usl"]["best"]["stage1"]["metric"] == "mAP" and last["usl"]["best"]["stage2"]["metric"] == "rank1"
    assert last["global_step"] == 2 * 2 + 6 * 2 + 2 * 2
    # the camera-local files hold each camera's kept clustering, as the checkpoint does
    listing = data.pseudo.usl_listings(_demo_dataset(reference))
    for cam in range(6):
        part = torch.load(os.path.join(reference, "camera_local_%d.pth" % cam), weights_only=True)
        modality = 1 if cam in (2, 5) else 0
        rows = part["rows"].numpy()
        assert part["modality"] == modality and (listing[modality].cams[rows] == cam).all()
        assert rows.tolist() == np.flatnonzero(listing[modality].cams == cam).tolist()
        assert torch.equal(part["labels"], last["usl"]["camera_local"][str(cam)]["labels"])
    best, stage2 = load_checkpoint(os.path.join(reference, "best.pth")), load_checkpoint(
        os.path.join(reference, "stage2_best.pth"))
    assert all(torch.equal(best["model"][k], stage2["model"][k]) for k in best["model"])


def _demo_dataset(run_dir):
    from data.datasets.demo import DemoDataset
    from utils.config import config_from_string

    return DemoDataset(config_from_string(open(os.path.join(run_dir, "config.yaml")).read()))


def test_resume_inside_a_camera_run_and_inside_stage2_is_bitwise(reference, tiny_demo_root, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # camera-local calls: cam2 (2 iterations), cam5 (2), then cam0's first -> stop inside cam0
    monkeypatch.setattr(usl_epoch, "camera_local_loss", SignalAtCall(usl_epoch.camera_local_loss, 5))
    assert train_usl.main(usl_opts(tiny_demo_root, out)) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert (ckpt["usl"]["stage"], ckpt["epoch"], ckpt["iteration"]) == ("cam0", -1, 1)
    assert ckpt["usl"]["epoch_state"] is not None and sorted(ckpt["usl"]["camera_local"]) == ["2", "5"]
    monkeypatch.undo()
    # stage-2 calls: epoch 0 (2), then epoch 1's first -> stop inside stage 2's epoch 1
    step = SignalAtCall(usl_epoch.TokenMatcherStage2.__call__, 3, method=True)
    monkeypatch.setattr(usl_epoch.TokenMatcherStage2, "__call__", step)
    assert train_usl.main(["--resume"] + usl_opts(tiny_demo_root, out)) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert (ckpt["usl"]["stage"], ckpt["epoch"], ckpt["iteration"]) == ("stage2", 0, 1)
    state = ckpt["usl"]["epoch_state"]
    assert state["kind"] == "stage2" and state["match"] is not None and state["neighbours"] is not None
    monkeypatch.undo()
    assert train_usl.main(usl_opts(tiny_demo_root, out) + ["--resume"]) == 0
    assert_same_run(reference, out)
    log = open(os.path.join(out, "train.log")).read()
    assert "resuming cam0 epoch 0 at iteration 1" in log and "resuming stage2 epoch 1 at iteration 1" in log


def test_stop_between_stages_resumes_bitwise(reference, tiny_demo_root, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # stage 1's last step: the stop takes effect before cam2's first epoch
    monkeypatch.setattr(usl_epoch, "stage1_loss", SignalAtCall(usl_epoch.stage1_loss, 4))
    assert train_usl.main(usl_opts(tiny_demo_root, out)) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert (ckpt["usl"]["stage"], ckpt["epoch"], ckpt["iteration"]) == ("cam2", -1, 0)
    monkeypatch.undo()
    assert train_usl.main(["--resume", os.path.join(out, "last.pth")]) == 0  # the checkpoint's own config
    assert_same_run(reference, out)


def test_training_never_reads_the_identities(reference, tiny_demo_root, tmp_path, monkeypatch):
    """Shuffled visible identities and erased infrared ones: other monitoring figures, same weights."""
    real = data.pseudo.usl_listings

    def hidden(dataset):
        rgb, ir = real(dataset)
        shuffled = np.random.default_rng(0).permutation(rgb.true_pids)
        return (ModalityListing(rgb.modality, rgb.images, rgb.paths, rgb.cams, shuffled),
                ModalityListing(ir.modality, ir.images, ir.paths, ir.cams, np.zeros_like(ir.true_pids)))

    monkeypatch.setattr(data.pseudo, "usl_listings", hidden)
    out = str(tmp_path / "run")
    assert train_usl.main(usl_opts(tiny_demo_root, out)) == 0
    for name in ("last.pth", "stage1_best.pth", "best.pth"):
        _checkpoints_equal(os.path.join(reference, name), os.path.join(out, name))
    ref = [r for r in read_metrics(os.path.join(reference, "metrics.jsonl")) if r["kind"] == "clusters"]
    new = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "clusters"]
    assert [r["rgb"]["clusters"] for r in ref if "rgb" in r] == [r["rgb"]["clusters"] for r in new if "rgb" in r]
    assert [r["rgb"]["nmi"] for r in ref if "rgb" in r] != [r["rgb"]["nmi"] for r in new if "rgb" in r]
    assert all(r["ir"]["nmi"] == 0.0 for r in new if "ir" in r)


def test_bad_input_is_one_clear_error(tiny_demo_root, tmp_path, reference):
    base = usl_opts(tiny_demo_root, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="--stage stage3: no such stage for demo .*stage1, cam2"):
        train_usl.main(base + ["--stage", "stage3", "--from", os.path.join(reference, "stage1_best.pth")])
    with pytest.raises(ConfigError, match="--stage stage2 needs --from CKPT"):
        train_usl.main(base + ["--stage", "stage2"])
    with pytest.raises(ConfigError, match="--from .* needs --stage NAME"):
        train_usl.main(base + ["--from", os.path.join(reference, "stage1_best.pth")])
    with pytest.raises(Exception, match="not a resumable train_usl.py checkpoint"):
        train_usl.main(base + ["--resume", os.path.join(reference, "best.pth")])
    with pytest.raises(ConfigError, match="train_usl.py trains models without labels"):
        train_usl.main(["--method", "cmfn", "--dataset", "demo", "DATASET.ROOT", tiny_demo_root,
                        "OUTPUT_DIR", str(tmp_path / "y")])
    with pytest.raises(ConfigError, match="through the clustering loop of train_usl.py"):
        train.main(base[2:] + ["--method", "tokenmatcher", "--dataset", "demo"])
    with pytest.raises(ConfigError, match="USL.INPUT.SIZE"):
        train_usl.main(base + ["USL.INPUT.SIZE", "[32,16]"])
    with pytest.raises(ConfigError, match="USL.CAMERA_PRUNING needs a camera-local run of every camera"):
        train_usl.main(base + ["USL.CAMERA.CAMERAS", "[2,5]"])
    with pytest.raises(Exception, match="does not fit the configured encoder"):
        train_usl.main(base + ["--stage", "stage2", "--from", os.path.join(reference, "stage1_best.pth"),
                               "MODEL.TOKENMATCHER.EMBED_DIM", "16"])
    with pytest.raises(Exception, match="camera_local_0.pth is missing"):
        train_usl.main(usl_opts(tiny_demo_root, str(tmp_path / "z")) + [
            "--stage", "stage2", "--from", os.path.join(reference, "stage1_best.pth")])


def test_test_py_on_the_run_matches_the_in_training_evaluation(reference, tiny_demo_root, tmp_path, one_thread):
    out = str(tmp_path / "result.json")
    test_py.main(["--method", "tokenmatcher", "--dataset", "demo", "--resume", os.path.join(reference, "best.pth"),
                  "DATASET.ROOT", tiny_demo_root, "DATASET.DEMO_TRAIN_IDS", "10", "DATASET.DEMO_TEST_IDS", "6",
                  "INPUT.SIZE_TEST", "[64,32]", "TEST.NUM_TRIALS", "1", "--output", out])
    result = json.load(open(out))
    assert result["settings"]["flip_mode"] == "average_raw" and result["settings"]["feature"] == "feat"
    best = load_checkpoint(os.path.join(reference, "best.pth"))["usl"]["best"]
    trained = [r for r in read_metrics(os.path.join(reference, "metrics.jsonl"))
               if r["kind"] == "eval" and r["stage"] == "stage2" and r["epoch"] == best["epoch"]][0]
    for key in ("rank1", "mAP", "mINP"):
        assert result["mean"][key] == pytest.approx(trained[key], abs=1e-6)


# --- converted released checkpoints -------------------------------------------------------
def released_layout(model):
    """The state dict of `model` under the released key layout (``module.`` prefixes, the unused
    copies of the last block and norm, the BatchNorm template), as the released scripts save it."""
    out = {}

    def stem(key):
        return key.replace(".inorm.", ".IN.").replace(".bnorm.", ".BN.")

    depth = model.depth
    for key, value in model.state_dict().items():
        if key.startswith("stems.visible."):
            out["visible_module.visible." + stem(key[len("stems.visible."):])] = value
        elif key.startswith("stems.infrared."):
            out["thermal_module.thermal." + stem(key[len("stems.infrared."):])] = value
        elif key.startswith("last_block."):
            out["b1.0." + key[len("last_block."):]] = value
            out["blocks.%d.%s" % (depth - 1, key[len("last_block."):])] = torch.randn_like(value)
        elif key.startswith("last_norm."):
            out["b1.1." + key[len("last_norm."):]] = value
            out["norm." + key[len("last_norm."):]] = torch.randn_like(value)
        elif key.startswith("token_bns."):
            out["bottlenecks." + key[len("token_bns."):]] = value
            if key.startswith("token_bns.0."):
                out["bottleneck." + key[len("token_bns.0."):]] = value.clone()
        else:
            out[key] = value
    return {"module." + k: v for k, v in out.items()}


@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_converted_released_checkpoint_evaluates_with_the_released_protocol(dataset, synthetic_root, tmp_path,
                                                                            one_thread):
    torch.manual_seed(3)
    encoder = TokenMatcherEncoder(img_size=(64, 32), num_tokens=3, embed_dim=32, depth=2, num_heads=2, stem_width=8)
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong mapping shows
        for name, buf in encoder.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    src, dst = str(tmp_path / "model_best.pth.tar"), str(tmp_path / "converted.pth")
    torch.save({"state_dict": released_layout(encoder), "epoch": 37, "best_mAP": np.float64(0.6125)}, src)
    convert_main([src, dst, "--method", "tokenmatcher", "--dataset", dataset, "MODEL.TOKENMATCHER.NUM_HEADS", "2",
                  "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]", "USL.INPUT.SIZE", "[64,32]"])
    converted = load_model(dst)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in encoder.state_dict().items())
    meta = load_checkpoint(dst)["meta"]
    assert meta["released_epoch"] == 37 and meta["released_best_mAP"] == pytest.approx(0.6125)
    root = synthetic_root(dataset) if dataset == "regdb" else synthetic_root("sysu", preprocess=(16, 32))
    out, features = str(tmp_path / "result.json"), str(tmp_path / "features")
    test_py.main(["--method", "tokenmatcher", "--dataset", dataset, "--resume", dst, "DATASET.ROOT", root,
                  "INPUT.SIZE_TEST", "[64,32]", "TEST.NUM_TRIALS", "2", "--output", out, "--save-features", features])
    result = json.load(open(out))
    assert 0 < result["mean"]["mAP"] <= 1 and result["settings"]["flip_mode"] == "average_raw"
    # the released descriptor: the raw features of the image and its mirror averaged, then L2
    from data import TestImageDataset
    from utils.config import build_config

    if dataset == "regdb":
        features = os.path.join(features, "trial1")  # test.py keeps each list trial's features apart
    split = json.load(open(os.path.join(features, "split.json")))
    cfg = build_config(dataset, method="tokenmatcher", opts=["DATASET.ROOT", root, "INPUT.SIZE_TEST", "[64,32]"])
    images = torch.stack([TestImageDataset(split["query_paths"][:5], cfg)[k][0] for k in range(5)])
    with torch.no_grad():
        expected = flip_average(encoder.eval(), images, split["query_modality"])
        naive = F.normalize(encoder(images, split["query_modality"])["feat"]
                            + encoder(images.flip(3), split["query_modality"])["feat"], dim=1)
    saved = torch.from_numpy(np.load(os.path.join(features, "query_feat.npy"))[:5])
    torch.testing.assert_close(saved, expected, rtol=0, atol=1e-6)
    # not the (re-normalised) mean of the normalised outputs, which differs where the norms do
    assert (saved - naive).abs().max() > max(1e-5, 20 * (saved - expected).abs().max())
