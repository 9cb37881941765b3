"""train.py's command line and model selection, and train_regdb.sh's argument forwarding."""
import os
import subprocess
import sys

import pytest

import train
from engine.run_config import resolve_run_config
from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$CALLS"
case "$*" in *"DATASET.TRIAL $FAIL_TRIAL"*) exit 1;; esac
"""


def _run_script(tmp_path, args, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    full_env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), FAIL_TRIAL="none")
    full_env.update(env)
    result = subprocess.run(["sh", os.path.join(ROOT, "train_regdb.sh")] + args, capture_output=True, text=True,
                            env=full_env, cwd=str(tmp_path))
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, lines


def test_train_regdb_sh_runs_every_trial(tmp_path):
    result, lines = _run_script(tmp_path, ["--overwrite", "SOLVER.AMP", "bf16"])
    assert result.returncode == 0, result.stderr
    train_py = os.path.join(ROOT, "train.py")
    assert lines == ["%s --dataset regdb --overwrite SOLVER.AMP bf16 DATASET.TRIAL %d" % (train_py, t)
                     for t in range(1, 11)]
    # each trial's command resolves to its own run directory
    for t, line in enumerate(lines, 1):
        cfg, _, _, _ = resolve_run_config(train.parse_args(line.split()[1:]))
        assert cfg.DATASET.TRIAL == t and cfg.OUTPUT_DIR == os.path.join("runs", "regdb_trial%d" % t)


def test_train_regdb_sh_with_a_method(tmp_path):
    result, lines = _run_script(tmp_path, ["--method", "ivreid"], TRIALS="1 2")
    assert result.returncode == 0, result.stderr
    for t, line in enumerate(lines, 1):
        cfg, _, _, _ = resolve_run_config(train.parse_args(line.split()[1:]))
        assert (cfg.METHOD, cfg.MODEL.NAME, cfg.DATASET.TRIAL) == ("ivreid", "ivreid", t)
        assert cfg.OUTPUT_DIR == os.path.join("runs", "ivreid_regdb_trial%d" % t)
    (tmp_path / "calls.txt").unlink()
    result, lines = _run_script(tmp_path, ["--method", "ivreid"], TRIALS="4", OUTPUT_ROOT="/x/runs")
    assert lines[0].split()[-2:] == ["OUTPUT_DIR", "/x/runs/ivreid_regdb_trial4"]


def test_train_regdb_sh_output_root_trials_and_failures(tmp_path):
    result, lines = _run_script(tmp_path, ["--resume"], TRIALS="2 3", OUTPUT_ROOT="/x/runs")
    assert result.returncode == 0, result.stderr
    assert [line.split()[1:] for line in lines] == [
        ["--dataset", "regdb", "--resume", "DATASET.TRIAL", str(t), "OUTPUT_DIR", "/x/runs/regdb_trial%d" % t]
        for t in (2, 3)]
    args = train.parse_args(lines[0].split()[1:])
    assert args.resume == "" and args.opts[:2] == ["DATASET.TRIAL", "2"]
    (tmp_path / "calls.txt").unlink()
    result, lines = _run_script(tmp_path, [], TRIALS="1 2 3", FAIL_TRIAL="2")
    assert result.returncode != 0 and len(lines) == 2  # stops at the failing trial
    (tmp_path / "calls.txt").unlink()
    result, lines = _run_script(tmp_path, ["OUTPUT_DIR", "x"])
    assert result.returncode == 2 and "OUTPUT_ROOT" in result.stderr and not lines


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0
    for flag in ("--dataset", "--config", "--resume", "--overwrite", "--check-sync"):
        assert flag in result.stdout


@pytest.mark.slow
def test_select_by_val(tmp_path_factory, tiny_demo_root):
    data_root = tiny_demo_root
    out = str(tmp_path_factory.mktemp("val") / "run")
    opts = {
        "OUTPUT_DIR": out, "DATASET.ROOT": data_root, "DATASET.VAL_IDS": 3,
        "DATASET.DEMO_TRAIN_IDS": 10, "DATASET.DEMO_TEST_IDS": 6,
        "INPUT.SIZE_TRAIN": "[64,32]", "INPUT.SIZE_TEST": "[64,32]",
        "DATALOADER.NUM_IDS": 4, "DATALOADER.NUM_POS": 2, "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.ITERS_PER_EPOCH": 1, "SOLVER.MAX_EPOCHS": 2, "SOLVER.EVAL_START": 0, "SOLVER.WARMUP_EPOCHS": 1,
        "SOLVER.BASE_LR": 0.01, "SOLVER.EVAL_BEFORE_TRAIN": False,
        "SOLVER.SELECT_BY": "val", "SOLVER.BEST_METRIC": "mAP",
        "TEST.NUM_TRIALS": 1, "TEST.BATCH_SIZE": 64,
    }
    assert train.main(["--dataset", "demo"] + [str(x) for kv in opts.items() for x in kv]) == 0
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "test"), (0, "val"), (1, "test"), (1, "val")]
    val = [r for r in records if r["split"] == "val"]
    best = load_checkpoint(os.path.join(out, "best.pth"))
    assert best["best"]["select_by"] == "val" and best["best"]["metric"] == "mAP"
    best_epoch = max(val, key=lambda r: (r["mAP"], -r["epoch"]))["epoch"]
    assert best["epoch"] == best_epoch and best["best"]["value"] == max(r["mAP"] for r in val)
    log = open(os.path.join(out, "train.log")).read()
    assert "selected on the TEST set" not in log
    assert load_checkpoint(os.path.join(out, "last.pth"))["epoch"] == 1


def test_demo_command_line_smoke(tmp_path_factory, tiny_demo_root):
    """`python train.py --dataset demo` as documented, shortened to 2 steps on a smaller demo
    dataset (the full demo run is measured for the README, not here)."""
    data_root = tiny_demo_root
    out = str(tmp_path_factory.mktemp("demo") / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "demo", "OUTPUT_DIR", out,
           "DATASET.ROOT", data_root, "DATASET.DEMO_TRAIN_IDS", "10", "DATASET.DEMO_TEST_IDS", "6",
           "SOLVER.MAX_EPOCHS", "1", "SOLVER.ITERS_PER_EPOCH", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [-1, 0]  # untrained (EVAL_BEFORE_TRAIN) and final
    assert {"config.yaml", "train.log", "last.pth", "best.pth"} <= set(os.listdir(out))
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal
