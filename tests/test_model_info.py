"""tools/model_info.py: parameter counts against the released model's, FLOPs against hand counts."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import build_model
from tools.model_info import count_flops, main, model_info
from utils.config import build_config

# Parameter counts of the released model per module (docs/cmfn.md), minus what this project
# does not build.
RELEASED_SYSU = {
    "backbone.visible_stem": 9536, "backbone.infrared_stem": 9536,
    "backbone.layer1": 215808, "backbone.layer2": 1219584, "backbone.layer3": 7098368, "backbone.layer4": 14964736,
    "hce_a": 485120 + 1836800, "mfa1": 63264, "hce_b": 2034176, "mfa2": 594048,
    "dilated_bottleneck": 854016, "mfa3": 2367744,
    # MBUE total minus the two dead context convs, dead compression1, and the Haar filter
    # constants (4 banks of 4,096 values) which are not parameters here.
    "mbue": 51797738 - 2 * 2359296 - 262656 - 4 * 4096,
    "head": 4096 + 808960,
}
RELEASED_REGDB_MBUE = 12983786 - 2 * 589824 - 65792 - 4 * 2048


def test_sysu_parameters_match_the_released_model():
    info = model_info(build_config("sysu", opts=["MODEL.PRETRAINED", "False"]), 395, flops=False)
    assert {row["name"]: row["params"] for row in info["modules"]} == RELEASED_SYSU
    assert info["params_total"] == sum(RELEASED_SYSU.values()) == 131370058 - 51987776 - 16384
    assert info["params_trainable"] == info["params_total"] - 2048  # the frozen BNNeck bias
    assert info["feat_dim"] == 2048 and info["released"]["released_total"] == 131370058


def test_regdb_parameters_match_the_released_model():
    info = model_info(build_config("regdb", opts=["MODEL.PRETRAINED", "False"]), 206, flops=False)
    rows = {row["name"]: row["params"] for row in info["modules"]}
    assert rows["mbue"] == RELEASED_REGDB_MBUE
    assert rows["head"] == 2048 + 210944
    assert "backbone.layer4" not in rows and "mfa3" not in rows and "dilated_bottleneck" not in rows
    assert info["params_total"] == 89588298 - 64070720 - 8192


def _conv_linear_flops(model, x, modality):
    """2 x multiply-accumulates of every conv and linear layer, from forward hooks."""
    total = []

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        macs = output.numel() * (module.in_channels // module.groups) * kh * kw
        total.append(2 * macs)

    def linear_hook(module, inputs, output):
        total.append(2 * output.numel() * module.in_features)

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x, modality=modality)
    for handle in handles:
        handle.remove()
    return sum(total)


def test_flops_equal_hand_count_for_the_baseline():
    cfg = build_config("sysu", opts=["MODEL.NAME", "baseline", "MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False"])
    model = build_model(cfg, 5).eval()
    total, per_module = count_flops(model, 64, 32)
    assert total == _conv_linear_flops(model, torch.zeros(1, 3, 64, 32), "visible")
    assert sum(per_module.values()) == total


def test_cpu_attention_is_counted():
    class Attention(nn.Module):
        def forward(self, x, modality=None):
            q = x.flatten()[:2 * 64 * 16].reshape(1, 2, 64, 16)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(64, 64))

    total, _ = count_flops(Attention(), 32, 64)
    assert total == 2 * 2 * (2 * 64 * 64 * 16)  # q.k and attention.v, 2 FLOPs per MAC


def test_cli_on_a_tiny_cmfn(tmp_path, capsys):
    out = str(tmp_path / "info.json")
    main(["--dataset", "demo", "--json", out, "INPUT.SIZE_TEST", "[64, 32]"])
    lines = capsys.readouterr().out.splitlines()
    with open(out) as f:
        info = json.load(f)
    # the printed table carries the numbers of the JSON report
    for row in info["modules"]:
        assert [row["name"], "{:,}".format(row["params"]), "{:,}".format(row["trainable"])] in [
            line.split() for line in lines], row["name"]
    assert any("64x32" in line and line.endswith(" %.1f G" % (info["flops_per_image"] / 1e9)) for line in lines)
    for name, value in info["flops_per_module"].items():
        assert [name, "%.2f" % (value / 1e9), "G"] in [line.split() for line in lines], name
    assert info["backbone"] == "resnet18" and info["num_copies"] == 3
    assert info["flops_per_image"] > 0
    assert sum(info["flops_per_module"].values()) == info["flops_per_image"]
    assert sum(row["params"] for row in info["modules"]) == info["params_total"]
    assert "released" not in info


@pytest.mark.parametrize("opts", [["MODEL.CMFN.FIX.CONTEXT_PATH", "True"]])
def test_released_comparison_only_for_the_released_layout(opts):
    info = model_info(build_config("regdb", opts=["MODEL.PRETRAINED", "False", *opts]), 206, flops=False)
    assert "released" not in info
