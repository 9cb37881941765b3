"""Speed switches of train.py on CPU, a few steps each (tiny demo config): bf16 autocast +
channels_last, the fp16 GradScaler path, torch.compile, and the configuration errors for
fp16 / SyncBN on a CPU."""
import os
import time

import pytest
import torch

import loss as loss_pkg
import model as model_pkg
import train
from engine.checkpoint import load_checkpoint
from utils.config import ConfigError
from engine.run_dir import read_metrics
from engine.training import MixedPrecision
from tiny_train import tiny_opts


@pytest.fixture(scope="module")
def data_root(tiny_demo_root):
    return tiny_demo_root


class Recorder:
    """Criterion wrapper recording the dtype of the features and the loss terms of every step."""

    def __init__(self, inner):
        self.inner, self.dtypes, self.terms = inner, [], []
        self.required_outputs = inner.required_outputs

    def __call__(self, outputs, *args):
        self.dtypes.append(outputs["pool"].dtype)
        total, terms, info = self.inner(outputs, *args)
        self.terms.append(terms)
        return total, terms, info


@pytest.fixture
def recorded(monkeypatch):
    seen = {}
    build_loss, build_model = loss_pkg.build_criterion, model_pkg.build_model

    def record_loss(cfg):
        seen["criterion"] = Recorder(build_loss(cfg))
        return seen["criterion"]

    def record_model(cfg, num_classes):
        seen["model"] = build_model(cfg, num_classes)
        return seen["model"]

    monkeypatch.setattr(loss_pkg, "build_criterion", record_loss)
    monkeypatch.setattr(model_pkg, "build_model", record_model)
    return seen


def test_bf16_channels_last_overwriting_an_earlier_run(tmp_path, data_root, recorded):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.yaml", "last.pth", "metrics.jsonl"):
        (out / name).write_text("an earlier run\n")
    (out / "keep.txt").write_text("not a run file\n")
    opts = tiny_opts(data_root, str(out), **{"SOLVER.AMP": "bf16", "SOLVER.CHANNELS_LAST": True})
    assert train.main(["--dataset", "demo", "--overwrite"] + opts) == 0
    criterion = recorded["criterion"]
    assert criterion.dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(torch.isfinite(torch.tensor(t["total"])) for t in criterion.terms)
    convs = [m for m in recorded["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert load_checkpoint(str(out / "last.pth"))["epoch"] == 0
    assert [r["epoch"] for r in read_metrics(str(out / "metrics.jsonl"))] == [0]
    assert (out / "keep.txt").exists()
    assert "overwrote 3 files" in (out / "train.log").read_text()


class ScaledCpu(MixedPrecision):
    """An enabled GradScaler on the CPU, to run the fp16 loss-scaling code path here (train.py
    refuses fp16 on a CPU). fp16 and bf16 CPU kernels are emulated on CPUs without native ones
    (minutes per step), and the scaler logic does not depend on the autocast dtype, so the steps
    run in fp32 (the autocast itself is tested with bf16 above)."""

    def __init__(self, mode, device_type):
        super().__init__("none" if mode == "fp16" else mode, device_type)
        if mode == "fp16":
            self.mode = "fp16"
            self.scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 10)


def test_fp16_gradscaler_path_and_resume(tmp_path, data_root, recorded, monkeypatch):
    import engine.run_config

    monkeypatch.setattr(train, "MixedPrecision", ScaledCpu)
    monkeypatch.setattr(engine.run_config, "MixedPrecision", ScaledCpu)
    out = str(tmp_path / "run")
    opts = tiny_opts(data_root, out, **{"SOLVER.AMP": "fp16"})
    assert train.main(["--dataset", "demo"] + opts) == 0
    assert recorded["criterion"].dtypes == [torch.float32, torch.float32]
    scaler = load_checkpoint(os.path.join(out, "last.pth"))["scaler"]
    assert scaler["scale"] == 2.0 ** 10 and scaler["_growth_tracker"] == 2  # two scaled, finite steps
    # the scaler state goes back in on resume and keeps counting
    assert train.main(["--dataset", "demo", "--resume"] + opts + ["SOLVER.MAX_EPOCHS", "2"]) == 0
    scaler = load_checkpoint(os.path.join(out, "last.pth"))["scaler"]
    assert scaler["_growth_tracker"] == 4


def test_fp16_and_sync_bn_on_cpu_are_config_errors(tmp_path, data_root):
    out = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train.main(["--dataset", "demo"] + tiny_opts(data_root, out, **{"SOLVER.AMP": "fp16"}))
    with pytest.raises(ConfigError, match="SYNC_BN needs CUDA"):
        train.main(["--dataset", "demo"] + tiny_opts(data_root, out, **{"SOLVER.SYNC_BN": True}))
    assert not os.path.exists(out)  # rejected before anything was written


def test_compile_traces_forward_and_backward(tmp_path, data_root, recorded):
    """SOLVER.COMPILE through dynamo + AOTAutograd (backend aot_eager: the same graph capture
    as inductor, without its code generation, which takes minutes on a 2-core CPU)."""
    out = str(tmp_path / "run")
    opts = tiny_opts(data_root, out, **{"SOLVER.COMPILE": True, "SOLVER.COMPILE_BACKEND": "aot_eager",
                                        "MODEL.NAME": "baseline"})
    assert train.main(["--dataset", "demo"] + opts) == 0
    assert len(recorded["criterion"].terms) == 2
    assert all(torch.isfinite(torch.tensor(t["total"])) for t in recorded["criterion"].terms)
    model_line = [line for line in open(os.path.join(out, "train.log")) if " model baseline/" in line][0]
    assert "compile True" in model_line and "aot_eager" in model_line


@pytest.mark.skipif(not os.environ.get("CMFN_TEST_COMPILE"), reason="inductor compilation of the CMFN takes minutes "
                    "on a 2-core CPU; set CMFN_TEST_COMPILE=1 to run it")
def test_compile(tmp_path, data_root, recorded):
    out = str(tmp_path / "run")
    start = time.time()
    assert train.main(["--dataset", "demo"] + tiny_opts(data_root, out, **{"SOLVER.COMPILE": True})) == 0
    print("compile run: %.1fs" % (time.time() - start))
    assert len(recorded["criterion"].terms) == 2
    assert "compile True" in open(os.path.join(out, "train.log")).read()
