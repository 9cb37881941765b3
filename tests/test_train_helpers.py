"""Unit tests of the training-loop helpers: engine/training.py, engine/run_dir.py,
utils/logger.py, engine/distributed.py (single process; tests/test_distributed_sync.py runs two),
engine/evaluate.py's schedule and selection, and train.py's argument handling."""
import glob
import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch

import train
from utils.config import ConfigError, build_config
from engine.distributed import DistContext, any_across_ranks, unwrap_model, wrap_model
from engine.evaluate import evaluation_due, update_best
from engine.run_config import config_differences
from engine.state import Progress
from utils.logger import TensorboardWriter, close_logger, setup_logger
from engine.run_dir import RunDirError, check_run_dir, prepare_run_dir, read_metrics, trim_metrics
from engine.training import (GracefulStop, MixedPrecision, NonFiniteError, capture_rng_state,
                            check_finite_loss, check_finite_state, derive_seed, restore_rng_state,
                            seed_epoch)


def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1),
            float(np.random.randn()))


def test_derive_seed_depends_only_on_its_inputs():
    assert derive_seed(0, 3) == derive_seed(0, 3)
    seeds = {derive_seed(s, e, r) for s in (0, 1) for e in range(-1, 5) for r in (0, 1)}
    assert len(seeds) == 2 * 6 * 2
    assert all(0 <= s < 2 ** 31 for s in seeds)


def test_seed_epoch_makes_draws_a_function_of_seed_and_epoch():
    seed_epoch(7, 2)
    a = _draws()
    _draws()  # advance the generators, as an earlier epoch in the same process would
    seed_epoch(7, 2)
    assert _draws() == a
    seed_epoch(7, 3)
    assert _draws() != a


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    seed_epoch(0, 0)
    random.gauss(0, 1)
    np.random.randn()  # leaves a cached gaussian in both generators
    state = capture_rng_state()
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    _draws()
    restore_rng_state(loaded)
    assert _draws() == expected


def test_mixed_precision_modes():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        MixedPrecision("fp16", "cpu")
    with pytest.raises(ConfigError, match="SOLVER.AMP"):
        MixedPrecision("fp8", "cpu")
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    bf16 = MixedPrecision("bf16", "cpu")
    with bf16.autocast():
        assert lin(x).dtype == torch.bfloat16
    assert not bf16.scaler.is_enabled()
    none = MixedPrecision("none", "cpu")
    with none.autocast():
        assert lin(x).dtype == torch.float32
    loss = lin(x).sum()
    assert none.scaler.scale(loss) is loss


def test_check_finite_loss_names_step_and_checkpoint():
    check_finite_loss({"id": 1.0, "total": 2.0}, 0, 0, 0, None)
    with pytest.raises(NonFiniteError) as err:
        check_finite_loss({"id": 1.0, "tri": float("nan"), "total": float("inf")}, 3, 5, 17,
                          "runs/x/last.pth (epoch 2)")
    msg = str(err.value)
    assert "epoch 3, iteration 5 (global step 17)" in msg
    assert "tri=nan" in msg and "total=inf" in msg
    assert "runs/x/last.pth (epoch 2)" in msg


def test_check_finite_state_names_the_tensors():
    bn = torch.nn.BatchNorm1d(3)
    check_finite_state(bn.state_dict(), 0, None)  # num_batches_tracked (int) is skipped
    bn.running_var[1] = float("inf")
    with pytest.raises(NonFiniteError, match="after epoch 4 in 1 tensor.*running_var.*Last good checkpoint: none"):
        check_finite_state(bn.state_dict(), 4, None)


def test_graceful_stop_turns_signals_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_run_dir_guard(tmp_path):
    run = str(tmp_path / "run")
    assert prepare_run_dir(run) == []
    check_run_dir(run)  # an empty directory is free
    for name in ("config.yaml", "train.log", "metrics.jsonl", "last.pth", "events.out.tfevents.1.host", "notes.txt"):
        (tmp_path / "run" / name).write_text("x")
    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--overwrite"):
        prepare_run_dir(run)
    with pytest.raises(RunDirError, match="contradict"):
        check_run_dir(run, resume=True, overwrite=True)
    check_run_dir(run, resume=True)
    removed = prepare_run_dir(run, overwrite=True)
    assert len(removed) == 5
    assert os.listdir(run) == ["notes.txt"]  # only the run's own files go


def test_trim_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "split": "test"}) + "\n" for e in (-1, 0, 1, 2)))
    assert trim_metrics(str(path), 0) == 2
    assert [r["epoch"] for r in read_metrics(str(path))] == [-1, 0]
    assert trim_metrics(str(path), 5) == 0


def test_logger_rank0_file_and_silent_other_ranks(tmp_path, capsys):
    log_file = str(tmp_path / "train.log")
    logger = setup_logger(log_file, rank=0, name="cmfn-test")
    logger.info("hello %d", 1)
    logger.warning("careful")
    close_logger(logger)
    assert "hello 1" in open(log_file).read() and "WARNING careful" in open(log_file).read()
    printed = capsys.readouterr()
    assert "hello 1" in printed.out and "careful" in printed.err
    logger = setup_logger(str(tmp_path / "rank1.log"), rank=1, name="cmfn-test")
    logger.info("quiet")
    logger.warning("quiet too")
    close_logger(logger)
    assert "quiet" not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "rank1.log")
    logging.getLogger("cmfn-test").handlers.clear()


def test_tensorboard_writer(tmp_path):
    tb = TensorboardWriter(str(tmp_path / "on"))
    tb.add_scalars("eval_test", {"rank1": 0.5, "mAP": 0.25}, 1)
    tb.close()
    assert glob.glob(str(tmp_path / "on" / "events.out.tfevents.*"))
    off = TensorboardWriter(str(tmp_path / "off"), enabled=False)
    off.add_scalar("x", 1.0, 0)
    off.close()
    assert not os.path.exists(tmp_path / "off")


def test_single_process_distributed_helpers():
    ctx = DistContext()
    model = torch.nn.Linear(3, 2)
    assert wrap_model(model, ctx) is model
    assert unwrap_model(model) is model
    assert any_across_ranks(ctx, [False, True]) == [False, True]
    with pytest.raises(ConfigError, match="SYNC_BN needs CUDA"):
        wrap_model(model, ctx, sync_bn=True)


def test_parse_args_recovers_flags_and_overrides():
    args = train.parse_args(["--dataset", "demo", "--resume", "SOLVER.MAX_EPOCHS", "2"])
    assert args.resume == "" and args.opts == ["SOLVER.MAX_EPOCHS", "2"]
    args = train.parse_args(["--dataset", "demo", "SOLVER.MAX_EPOCHS", "2", "--overwrite", "--resume", "x/last.pth"])
    assert args.overwrite and args.resume == "x/last.pth" and args.opts == ["SOLVER.MAX_EPOCHS", "2"]
    args = train.parse_args(["--resume", "runs/a/last.pth", "SEED", "3"])
    assert args.resume == "runs/a/last.pth" and args.opts == ["SEED", "3"]
    args = train.parse_args(["--dataset", "demo"])
    assert args.resume is None and not args.overwrite
    args = train.parse_args(["--method", "ivreid", "SEED", "1", "--dataset", "demo", "--check-sync"])
    assert (args.method, args.dataset, args.check_sync, args.opts) == ("ivreid", "demo", True, ["SEED", "1"])


def test_config_differences():
    a = build_config("demo", freeze=False)
    b = build_config("demo", opts=["SOLVER.MAX_EPOCHS", "3"], freeze=False)
    assert config_differences(a, b) == ["SOLVER.MAX_EPOCHS: 13 -> 3"]


def test_evaluation_schedule():
    cfg = build_config("demo", opts=["SOLVER.MAX_EPOCHS", "6", "SOLVER.EVAL_START", "1", "SOLVER.EVAL_PERIOD", "2"])
    assert [e for e in range(6) if evaluation_due(cfg, e)] == [1, 3, 5]
    cfg = build_config("demo", opts=["SOLVER.MAX_EPOCHS", "4", "SOLVER.EVAL_START", "9"])
    assert [e for e in range(4) if evaluation_due(cfg, e)] == [3]  # the last epoch always


def test_selection_rules():
    cfg = build_config("demo", opts=["SOLVER.SELECT_BY", "test", "SOLVER.BEST_METRIC", "mAP"])
    progress = Progress()
    assert update_best(cfg, progress, {"test": {"mAP": 0.2}}, 1) and progress.best_epoch == 1
    assert not update_best(cfg, progress, {"test": {"mAP": 0.1}}, 3) and progress.best_value == 0.2
    assert not update_best(cfg, progress, {}, 4)
    assert update_best(cfg, progress, {"test": {"mAP": 0.3}}, 5) and (progress.best_value, progress.best_epoch) == (0.3, 5)
    last = build_config("demo", opts=["SOLVER.SELECT_BY", "last"])
    assert update_best(last, progress, {}, 6) and progress.best_epoch == 6


def test_bf16_on_a_cpu_without_native_kernels_is_flagged(monkeypatch):
    import engine.training as training

    monkeypatch.setattr(training, "native_bf16", lambda device_type: False)
    assert "no native bf16 kernels" in training.MixedPrecision("auto", "cpu").warning()
    assert training.MixedPrecision("none", "cpu").warning() == ""
    monkeypatch.setattr(training, "native_bf16", lambda device_type: True)
    assert training.MixedPrecision("bf16", "cpu").warning() == ""


def test_train_usl_reads_resume_key_value_as_an_override():
    import train_usl

    args = train_usl.parse_args(["--resume", "USL.STAGE1.EPOCHS", "3", "--stage", "stage2"])
    assert (args.resume, args.opts, args.stage) == ("", ["USL.STAGE1.EPOCHS", "3"], "stage2")
    assert train_usl.parse_args(["--dataset", "demo"]).method == "tokenmatcher"
