"""Exact resume: a run interrupted (between epochs, mid-epoch, or by a real SIGTERM in a
subprocess with a loader worker) and resumed with --resume ends with bitwise the same weights,
optimizer state and metrics as an uninterrupted run (CPU, DETERMINISTIC, tiny demo config)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import loss as loss_pkg
import train
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from tiny_train import tiny_opts as shared_tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_opts(data_root, out_dir, **extra):
    return shared_tiny_opts(data_root, out_dir, **dict({'DETERMINISTIC': True, 'SOLVER.MAX_EPOCHS': 3, 'SOLVER.STEPS': '[2]', 'SOLVER.EVAL_START': 1, 'SOLVER.EVAL_PERIOD': 1, 'SOLVER.EVAL_BEFORE_TRAIN': True, 'SOLVER.SELECT_BY': 'test'}, **extra))


@pytest.fixture(scope="module")
def data_root(tiny_demo_root):
    return tiny_demo_root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, one_thread):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert train.main(["--dataset", "demo"] + tiny_opts(data_root, out)) == 0
    return out


class SignalAtCall:
    """Criterion wrapper that sends `sig` to this process during its `at`-th call."""

    def __init__(self, inner, at, sig=signal.SIGTERM):
        self.inner, self.at, self.sig, self.calls = inner, at, sig, 0
        self.required_outputs = inner.required_outputs

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.inner(*args)


def _patch_loss(monkeypatch, at, sig=signal.SIGTERM):
    build = loss_pkg.build_criterion
    monkeypatch.setattr(loss_pkg, "build_criterion", lambda cfg: SignalAtCall(build(cfg), at, sig))


def assert_same_run(run_a, run_b):
    a = load_checkpoint(os.path.join(run_a, "last.pth"))
    b = load_checkpoint(os.path.join(run_b, "last.pth"))
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 0
    assert a["global_step"] == b["global_step"] == 6
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, "weights differ: %s" % differing[:5]
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert a["best"] == b["best"]
    assert read_metrics(os.path.join(run_a, "metrics.jsonl")) == read_metrics(os.path.join(run_b, "metrics.jsonl"))


def test_reference_run_outputs(reference):
    names = set(os.listdir(reference))
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pth", "best.pth"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    records = read_metrics(os.path.join(reference, "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [-1, 1, 2]  # EVAL_START 1, as released
    for r in records:
        assert r["split"] == "test" and r["gallery_trial"] == 0
        assert all(0.0 <= r[k] <= 1.0 for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"))
    ckpt = torch.load(os.path.join(reference, "last.pth"), weights_only=True)  # plain tensors and values only
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "best", "epoch", "iteration"} <= set(ckpt)
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and isinstance(ckpt["rng"]["python"][1], list)
    best = load_checkpoint(os.path.join(reference, "best.pth"))
    assert best["epoch"] == ckpt["best"]["epoch"]
    log = open(os.path.join(reference, "train.log")).read()
    assert "selected on the TEST set" in log and "Rank-1" in log


def test_resume_between_epochs(tmp_path, data_root, reference, monkeypatch, one_thread):
    out = str(tmp_path / "run")
    _patch_loss(monkeypatch, at=4)  # last step of epoch 1: the epoch finishes, epoch 2 never starts
    assert train.main(["--dataset", "demo"] + tiny_opts(data_root, out)) == 128 + signal.SIGTERM
    saved = load_checkpoint(os.path.join(out, "last.pth"))
    assert (saved["epoch"], saved["iteration"]) == (1, 0)
    monkeypatch.undo()
    # config from the checkpoint itself
    assert train.main(["--resume", os.path.join(out, "last.pth")]) == 0
    assert_same_run(reference, out)


def test_resume_mid_epoch(tmp_path, data_root, reference, monkeypatch, one_thread):
    out = str(tmp_path / "run")
    _patch_loss(monkeypatch, at=3, sig=signal.SIGINT)  # epoch 1, first of two steps
    assert train.main(["--dataset", "demo"] + tiny_opts(data_root, out)) == 128 + signal.SIGINT
    saved = load_checkpoint(os.path.join(out, "last.pth"))
    assert (saved["epoch"], saved["iteration"], saved["global_step"]) == (0, 1, 3)
    monkeypatch.undo()
    assert train.main(["--dataset", "demo", "--resume"] + tiny_opts(data_root, out)) == 0
    assert_same_run(reference, out)
    assert "+1 iterations of epoch 1" in open(os.path.join(out, "train.log")).read()


def test_sigterm_subprocess_with_a_worker_then_resume(tmp_path, data_root, reference):
    out = str(tmp_path / "run")
    opts = tiny_opts(data_root, out, **{"DATALOADER.NUM_WORKERS": 1, "DATALOADER.PERSISTENT_WORKERS": True})
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "demo"] + opts
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "train.log")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and "epoch 1 [1/2]" in open(log).read():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 128 + signal.SIGTERM, proc.stderr.read()
    saved = load_checkpoint(os.path.join(out, "last.pth"))
    assert saved["epoch"] in (0, 1)
    result = subprocess.run(cmd[:2] + ["--dataset", "demo", "--resume"] + opts, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference, out)
