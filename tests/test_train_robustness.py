"""train.py robustness: a non-finite loss stops the run naming the step and the last good
checkpoint; a run directory that holds a run is not reused without --resume / --overwrite;
clear errors for resume without a checkpoint and for inconsistent selection settings."""
import os
import subprocess
import sys

import pytest

import loss as loss_pkg
import train
from data.errors import DatasetError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.training import NonFiniteError
from utils.config import ConfigError
from engine.run_dir import RunDirError
from tiny_train import tiny_opts as shared_tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_opts(data_root, out_dir, **extra):
    return shared_tiny_opts(data_root, out_dir, **dict({'SOLVER.MAX_EPOCHS': 3, 'SOLVER.EVAL_START': 5}, **extra))


@pytest.fixture(scope="module")
def data_root(tiny_demo_root):
    return tiny_demo_root


class NanAtCall:
    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.required_outputs = inner.required_outputs

    def __call__(self, *args):
        self.calls += 1
        total, terms, info = self.inner(*args)
        if self.calls == self.at:
            total = total * float("nan")
            terms = dict(terms, tri=float("nan"), total=float("nan"))
        return total, terms, info


def test_nan_loss_stops_the_run(tmp_path, data_root, monkeypatch):
    build = loss_pkg.build_criterion
    monkeypatch.setattr(loss_pkg, "build_criterion", lambda cfg: NanAtCall(build(cfg), at=3))
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteError) as err:
        train.main(["--dataset", "demo"] + tiny_opts(data_root, out))
    msg = str(err.value)
    assert "epoch 1, iteration 0 (global step 2)" in msg and "tri=nan" in msg
    assert "Last good checkpoint: %s (epoch 0)" % os.path.join(out, "last.pth") in msg
    assert load_checkpoint(os.path.join(out, "last.pth"))["epoch"] == 0  # the NaN state was not saved
    assert "non-finite loss at epoch 1" in open(os.path.join(out, "train.log")).read()


def test_absurd_learning_rate_exits_with_a_clear_error(tmp_path, data_root):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "demo"]
    cmd += tiny_opts(data_root, out, **{"SOLVER.BASE_LR": 1e30, "SOLVER.WARMUP_EPOCHS": 0, "SOLVER.MAX_EPOCHS": 2})
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ERROR non-finite loss at epoch" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_directory_guard_and_resume_errors(tmp_path, data_root):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("earlier run\n")
    with pytest.raises(RunDirError, match="already holds a run"):
        train.main(["--dataset", "demo"] + tiny_opts(data_root, str(out)))
    assert (out / "config.yaml").read_text() == "earlier run\n"
    with pytest.raises(CheckpointError, match="no checkpoint at .*last.pth"):
        train.main(["--dataset", "demo", "--resume"] + tiny_opts(data_root, str(out)))
    with pytest.raises(ConfigError, match="DATASET.VAL_IDS"):
        train.main(["--dataset", "demo"] + tiny_opts(data_root, str(tmp_path / "x"), **{"SOLVER.SELECT_BY": "val"}))
    with pytest.raises(ConfigError, match="BEST_METRIC"):
        train.main(["--dataset", "demo"] + tiny_opts(data_root, str(tmp_path / "x"), **{"SOLVER.BEST_METRIC": "R1"}))


def test_missing_dataset_is_one_error_and_leaves_no_run_behind(tmp_path):
    out = str(tmp_path / "run")
    args = ["--dataset", "sysu", "OUTPUT_DIR", out, "DATASET.ROOT", str(tmp_path / "nowhere")]
    for _ in range(2):  # the second attempt is not refused as "already holds a run"
        with pytest.raises(DatasetError, match="root not found"):
            train.main(args)
    assert not os.path.exists(os.path.join(out, "config.yaml"))
    assert "ERROR SYSU-MM01 root not found" in open(os.path.join(out, "train.log")).read()
