"""train_usl.py --method cmag end to end on the tiny synthetic SYSU-layout demo tree (CPU, one
thread, DETERMINISTIC, a tiny encoder, stages 1 and 2 of two epochs of two iterations; the
camera-local runs are left out to keep it short, which the engine's own tests cover).

* the run trains CMAG's modules in stage 2 (the attention gate leaves 0, the graph memory
  fills), logs what is a reconstruction and the modules' monitoring values, and labels the
  evaluation records and test.py's JSON;
* the EMA teacher keeps stage 1's buffers and moves its parameters by 1 - alpha per step;
  with USL.CMAG.EVAL_WITH_EMA the selected model is the teacher;
* a run stopped inside stage 2 and resumed ends bitwise identical, the modules' parameters
  and memory buffers and the teacher included;
* a released CMAG checkpoint converts and evaluates through test.py --method cmag with the
  released protocol, as the authors' weights (no reconstruction label);
* the as-compiled circular loss (NaN with two labels in a batch) stops with one clear error;
  the fixed one trains;
* two gloo processes under torchrun train the modules outside DDP to the end.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine.usl.cmag as usl_cmag
import test as test_py
import train_usl
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from model import load_model
from model.cmag.encoder import METHOD_LABEL, CMAGEncoder
from model.tokenmatcher.encoder import TokenMatcherEncoder
from test_train_usl import SignalAtCall, _checkpoints_equal, released_layout, usl_opts
from tools.convert_official_checkpoint import main as convert_main
from utils.errors import ConfigError

CMAG = {"USL.CAMERA.CAMERAS": "[]", "USL.CAMERA_PRUNING": False, "USL.CMAG.CMA_HEADS": 2,
        "USL.CMAG.GRAPH_HIDDEN_DIM": 16, "USL.CMAG.GRAPH_MEMORY_SIZE": 8, "USL.CMAG.GRAPH_NEIGHBOURS": 3,
        "SOLVER.LOG_PERIOD": 1}
STEPS_PER_STAGE = 4  # 2 epochs x 2 iterations
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmag_opts(root, out, **extra):
    return ["--method", "cmag"] + usl_opts(root, out, **dict(CMAG, **extra))


@pytest.fixture(scope="module")
def cmag_run(tmp_path_factory, tiny_demo_root, one_thread):
    out = str(tmp_path_factory.mktemp("cmag_ref") / "run")
    assert train_usl.main(cmag_opts(tiny_demo_root, out)) == 0
    return out


def test_stage2_trains_the_modules_and_says_what_is_reconstructed(cmag_run):
    last = load_checkpoint(os.path.join(cmag_run, "last.pth"))
    modules = last["usl"]["step"]["modules"]
    assert float(modules["cma.gate"]) != 0.0  # in the optimiser: the gated residual left the identity
    assert int(modules["graph_memory.memory_ptr"]) == STEPS_PER_STAGE * (4 + 4)  # rows written: 4 RGB + 4 IR a step
    assert bool((modules["graph_memory.memory_features"].abs().sum(1) > 0).all())
    log = open(os.path.join(cmag_run, "train.log")).read()
    assert "cma_reconstructed: this project's reconstruction" in log and "[%s]" % METHOD_LABEL in log
    assert "EMA teacher alpha 0.999" in log and "graph_memory: CMAG's GraphMemoryEnhancement as released" in log
    stage2_lines = [line for line in log.splitlines() if "stage2 epoch" in line and "] loss" in line]
    assert len(stage2_lines) == STEPS_PER_STAGE and all("graph_fill 1" in l and "cma_gate" in l for l in stage2_lines)
    evals = [r for r in read_metrics(os.path.join(cmag_run, "metrics.jsonl")) if r["kind"] == "eval"]
    assert evals and all(r["method_label"] == METHOD_LABEL and r["evaluated"] == "encoder" for r in evals)
    assert isinstance(load_model(os.path.join(cmag_run, "best.pth")), CMAGEncoder)


def test_ema_teacher_keeps_stage1_buffers_and_moves_slowly(cmag_run):
    last = load_checkpoint(os.path.join(cmag_run, "last.pth"))
    ema, student = last["usl"]["step"]["ema"], last["model"]
    start = load_checkpoint(os.path.join(cmag_run, "stage1_best.pth"))["model"]
    params = dict(load_model(os.path.join(cmag_run, "best.pth")).named_parameters())
    for key, value in ema.items():
        if key not in params:  # buffers: the stage-1 model's, never averaged (as released)
            assert torch.equal(value, start[key]), key
    trainable = [k for k, p in params.items() if p.requires_grad and not torch.equal(student[k], start[k])]
    assert trainable
    # ema - start = sum_k (1 - a) a^(n-k) (theta_k - start): at most (1 - a) n max|theta_k - start|
    moved = sum(float((ema[k] - start[k]).norm()) for k in trainable)
    student_moved = sum(float((student[k] - start[k]).norm()) for k in trainable)
    assert 0 < moved < (1 - 0.999) * STEPS_PER_STAGE * 1.5 * student_moved


def test_resume_inside_stage2_restores_the_cmag_state_bitwise(cmag_run, tiny_demo_root, tmp_path, monkeypatch,
                                                              one_thread):
    out = str(tmp_path / "run")
    # stage-2 calls: epoch 0 (2), then epoch 1's first -> stop inside stage 2's epoch 1
    monkeypatch.setattr(usl_cmag.CMAGStage2, "__call__", SignalAtCall(usl_cmag.CMAGStage2.__call__, 3, method=True))
    assert train_usl.main(cmag_opts(tiny_demo_root, out)) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert (ckpt["usl"]["stage"], ckpt["epoch"], ckpt["iteration"]) == ("stage2", 0, 1)
    monkeypatch.undo()
    assert train_usl.main(cmag_opts(tiny_demo_root, out) + ["--resume"]) == 0
    a, b = _checkpoints_equal(os.path.join(cmag_run, "last.pth"), os.path.join(out, "last.pth"))
    for part in ("modules", "ema"):
        ref, new = a["usl"]["step"][part], b["usl"]["step"][part]
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), part
    for name in ("stage2_best.pth", "best.pth"):
        _checkpoints_equal(os.path.join(cmag_run, name), os.path.join(out, name))
    assert read_metrics(os.path.join(cmag_run, "metrics.jsonl")) == read_metrics(os.path.join(out, "metrics.jsonl"))


def test_eval_with_ema_selects_the_teacher(cmag_run, tiny_demo_root, tmp_path, one_thread):
    out = str(tmp_path / "run")
    assert train_usl.main(cmag_opts(tiny_demo_root, out, **{"USL.CMAG.EVAL_WITH_EMA": True, "SOLVER.SELECT_BY": "last"})
                          + ["--stage", "stage2", "--from", os.path.join(cmag_run, "stage1_best.pth")]) == 0
    last, best = load_checkpoint(os.path.join(out, "last.pth")), load_checkpoint(os.path.join(out, "best.pth"))
    ema = last["usl"]["step"]["ema"]
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema)
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in ema)
    evals = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"]
    assert evals and all(r["evaluated"] == "ema" for r in evals)


def test_circular_memory_as_compiled_fails_clearly_and_fixed_trains(cmag_run, tiny_demo_root, tmp_path, one_thread):
    start = ["--stage", "stage2", "--from", os.path.join(cmag_run, "stage1_best.pth")]
    with pytest.raises(ConfigError, match="USL.CMAG.CIRCULAR as_compiled: the released circular loss has no neg"):
        train_usl.main(cmag_opts(tiny_demo_root, str(tmp_path / "a"), **{"USL.CMAG.CIRCULAR": "as_compiled"})
                       + start)
    out = str(tmp_path / "b")
    # after one epoch, the tiny clusterings run the released second matching pass out of partners
    assert train_usl.main(cmag_opts(tiny_demo_root, out, **{"USL.CMAG.CIRCULAR": "fixed",
                                                          "USL.FIX_MATCH_SECOND_PASS": True}) + start) == 0
    log = open(os.path.join(out, "train.log")).read()
    lines = [line for line in log.splitlines() if "stage2 epoch" in line and "] loss" in line]
    assert len(lines) == STEPS_PER_STAGE and all("circular " in l and "lambda_graph 0.1" in l for l in lines)
    modules = load_checkpoint(os.path.join(out, "last.pth"))["usl"]["step"]["modules"]
    assert any(k.startswith("circular_memory.") for k in modules) and not any(k.startswith("graph_memory.")
                                                                              for k in modules)


def test_test_py_labels_a_cmag_model(cmag_run, tiny_demo_root, tmp_path, one_thread, capsys):
    out = str(tmp_path / "result.json")
    test_py.main(["--method", "cmag", "--dataset", "demo", "--resume", os.path.join(cmag_run, "best.pth"),
                  "DATASET.ROOT", tiny_demo_root, "DATASET.DEMO_TRAIN_IDS", "10", "DATASET.DEMO_TEST_IDS", "6",
                  "INPUT.SIZE_TEST", "[64,32]", "TEST.NUM_TRIALS", "1", "--output", out])
    result = json.load(open(out))
    assert result["settings"]["method_label"] == METHOD_LABEL and result["settings"]["flip_mode"] == "average_raw"
    assert METHOD_LABEL + ": demo" in capsys.readouterr().out  # the printed table's title
    trained = [r for r in read_metrics(os.path.join(cmag_run, "metrics.jsonl")) if r["kind"] == "eval"][-1]
    assert result["mean"]["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)


def test_bad_cmag_config_is_one_clear_error(cmag_run, tiny_demo_root, tmp_path):
    start = ["--stage", "stage2", "--from", os.path.join(cmag_run, "stage1_best.pth")]
    with pytest.raises(ConfigError, match="USL.CMAG.CMA_HEADS \\(3\\) must divide the attended width 32"):
        train_usl.main(cmag_opts(tiny_demo_root, str(tmp_path / "a"), **{"USL.CMAG.CMA_HEADS": 3}) + start)
    with pytest.raises(ConfigError, match="USL.CMAG.CIRCULAR"):
        train_usl.main(cmag_opts(tiny_demo_root, str(tmp_path / "b"), **{"USL.CMAG.CIRCULAR": "on"}) + start)


def test_converted_released_cmag_checkpoint_evaluates_as_the_authors_weights(synthetic_root, tmp_path, one_thread):
    torch.manual_seed(5)
    encoder = TokenMatcherEncoder(img_size=(64, 32), num_tokens=4, embed_dim=32, depth=2, num_heads=2, stem_width=8)
    src, dst = str(tmp_path / "cmag_sysu.pth.tar"), str(tmp_path / "converted.pth")
    # stage 2's best_mAP is a numpy float32 in the released files
    torch.save({"state_dict": released_layout(encoder), "epoch": 44, "best_mAP": np.float32(0.64)}, src)
    convert_main([src, dst, "--method", "cmag", "--dataset", "sysu", "MODEL.TOKENMATCHER.NUM_HEADS", "2",
                  "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]", "USL.INPUT.SIZE", "[64,32]"])
    converted = load_model(dst)
    assert type(converted) is TokenMatcherEncoder
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in encoder.state_dict().items())
    out = str(tmp_path / "result.json")
    test_py.main(["--method", "cmag", "--dataset", "sysu", "--resume", dst,
                  "DATASET.ROOT", synthetic_root("sysu", preprocess=(16, 32)), "INPUT.SIZE_TEST", "[64,32]",
                  "TEST.NUM_TRIALS", "2", "--output", out])
    settings = json.load(open(out))["settings"]
    assert settings["method"] == "cmag" and "method_label" not in settings
    assert settings["flip_mode"] == "average_raw" and settings["image_size"] == [64, 32]


@pytest.mark.slow
def test_cmag_under_torchrun_two_processes_gloo(tiny_demo_root, tmp_path):
    """The CMAG modules sit outside DDP (each process computes the loss of the gathered global
    batch): two processes train them to the end, with the step's state in the checkpoint."""
    out = str(tmp_path / "run")
    # the tiny clusterings can run the released second matching pass out of partners
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_usl.py")] + cmag_opts(tiny_demo_root, out, **{"USL.FIX_MATCH_SECOND_PASS": True})
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(os.path.join(out, "train.log")).read()
    assert "2 process(es)" in log and log.count("stage2 epoch 1 [2/2]") == 1  # rank 0 alone logs
    last = load_checkpoint(os.path.join(out, "last.pth"))
    assert last["meta"]["world_size"] == 2 and last["global_step"] == 2 * STEPS_PER_STAGE
    modules = last["usl"]["step"]["modules"]
    assert float(modules["cma.gate"]) != 0.0 and int(modules["graph_memory.memory_ptr"]) == STEPS_PER_STAGE * 8
    assert all(torch.isfinite(v).all() for v in last["usl"]["step"]["ema"].values() if v.is_floating_point())
