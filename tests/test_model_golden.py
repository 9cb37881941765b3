"""The model blocks against the golden tensors of the released code (tests/golden/*.pt).

For every module case: build the block from the case's ``init_args``, load the golden state
dict through the block's ``convert_released_state_dict`` (strict), and reproduce
``outputs_eval`` (eval, no_grad) and ``outputs_train`` (fresh module, dropout/DropPath 0,
batch-statistics BN), the BN buffers after that train forward, and the hooked intermediates
that have a counterpart here. The golden files were made with 2 intra-op threads.
"""
from pathlib import Path

import pytest
import torch

from model.cmfn import (csc_cma, dilated_bottleneck, global_block, hce, irmlp, local_block, mbue, mfa,
                   wtconv)

torch.set_num_threads(2)

GOLDEN = Path(__file__).resolve().parent / "golden"
RTOL, ATOL = 1e-5, 2e-5


def _hce(a, train):
    assert a["block_num"] == 3 and a["stride"] == 1
    return hce.HCE(a["in_planes"], a["inter_planes"], a["out_planes"], tuple(a["dilation"]))


def _mfa(a, train):
    return mfa.MFA(a["high_dim"], a["low_dim"], downsample=bool(a["flag"]))


def _layer5(a, train):
    assert a["blocks"] == 1 and a["stride"] == 1
    return dilated_bottleneck.DilatedBottleneck(a["inplanes"], a["planes"], a["dilation"])


def _wtconv(a, train):
    assert a["in_channels"] == a["out_channels"] and a["stride"] == 1 and not a["bias"]
    assert a["wt_levels"] == 1 and a["wt_type"] == "db1"
    return wtconv.WTConv2d(a["in_channels"], a["kernel_size"])


def _local(a, train):
    assert a["groups"] == a["dim"]
    return local_block.LocalBlock(a["dim"])


def _global(a, train):
    return global_block.GlobalBlock(a["dim"], a["num_heads"], a["window_size"], a["shift_size"],
                                    a["mlp_ratio"], drop_path=0.0 if train else a["drop_path"])


def _csc_cma(a, train):
    assert a["ch_1"] == a["ch_2"] == a["ch_int"] == a["ch_out"]
    assert a["context_dim"] is None and a["use_linear_attn"] and a["drop_rate"] == 0
    return csc_cma.CSCCMA(a["ch_1"], a["num_heads"])


def _irmlp(a, train):
    return irmlp.IRMLP(a["inp_dim"], a["out_dim"])


def _mbue(a, train):
    return mbue.MBUE(a["channel"], a["dim"], a["num_heads"], a["window_size"], a["shift_size"],
                     a["mlp_ratio"], drop_path=0.0 if train else 0.1,
                     dropout=0.0 if train else 0.01)


_HCE_HOOKS = {"process1": "shortcut", "conv_list.0": "units.0", "conv_list.1": "units.1",
              "conv_list.2": "units.2", "process2": "fuse"}
_MFA_HOOKS = {"CNL.W": "channel_nl.out_proj", "CNL": "channel_nl",
              "PNL.W": "position_nl.out_proj"}
_GLOBAL_HOOKS = {"norm1": "attn_norm", "attn": "attention", "norm2": "mlp_norm", "mlp": "mlp"}
_CSC_HOOKS = {"local_align": "local_align", "global_align": "global_align",
              "q_proj": "cross_attention.q_proj", "k_proj": "cross_attention.k_proj",
              "v_proj": "cross_attention.v_proj", "out_proj": "cross_attention.out_proj",
              "feature_enhancer.0": "enhancer.wtconv", "feature_enhancer": "enhancer",
              "norm": "fusion_norm", "final_fusion": "irmlp"}
_MBUE_HOOKS = {"FC11": "branch1.local_block", "FC12": "branch1.global_block",
               "compression2": "branch1.compress", "fu1": "branch1.fusion", "FC1": "branch1.up_proj",
               "FC21": "branch2.local_block", "FC22": "branch2.global_block",
               "compression3": "branch2.compress_local", "compression4": "branch2.compress_global",
               "fu2": "branch2.fusion", "FC2": "branch2.up_proj"}

# case -> (builder, converter module, golden intermediate -> our sub-module)
CASES = {
    "hce_a": (_hce, hce, _HCE_HOOKS),
    "hce_b": (_hce, hce, _HCE_HOOKS),
    "mfa_flag0": (_mfa, mfa, _MFA_HOOKS),
    "mfa_flag1": (_mfa, mfa, _MFA_HOOKS),
    "layer5": (_layer5, dilated_bottleneck,
               {"0.conv1": "reduce.conv", "0.bn1": "reduce.bn", "0.conv2": "dilated.conv",
                "0.bn2": "dilated.bn", "0.conv3": "expand.conv", "0.bn3": "expand.bn"}),
    "wtconv": (_wtconv, wtconv, {"wavelet_convs.0": "wavelet_conv", "base_conv": "base_conv"}),
    "local_block": (_local, local_block,
                    {"dwconv": "depthwise", "norm": "norm", "pwconv": "pointwise"}),
    "global_block": (_global, global_block, _GLOBAL_HOOKS),
    "global_block_regdb_like": (_global, global_block, _GLOBAL_HOOKS),
    "csc_cma": (_csc_cma, csc_cma, _CSC_HOOKS),
    "irmlp": (_irmlp, irmlp,
              {"conv1": "spatial", "bn1": "residual_bn", "conv2": "expand", "conv3": "project"}),
    "mbue": (_mbue, mbue, _MBUE_HOOKS),
}


def test_every_golden_module_case_is_covered():
    files = {p.stem for p in GOLDEN.glob("*.pt")} - {"losses"}
    assert files == set(CASES)


def _load(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def _build(name, case, train):
    builder, converter, _ = CASES[name]
    module = builder(case["init_args"], train)
    module.load_state_dict(converter.convert_released_state_dict(case["state_dict"]), strict=True)
    return module.train(train)


def _run_with_hooks(module, hooks, inputs):
    captured = {}

    def keep(golden_name):
        def hook(_module, _inputs, output):
            key, i = golden_name, 1
            while key in captured:
                key, i = f"{golden_name}#{i}", i + 1
            captured[key] = output.detach().clone()
        return hook

    handles = [module.get_submodule(ours).register_forward_hook(keep(golden))
               for golden, ours in hooks.items()]
    try:
        out = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def _assert_close(name, what, mine, golden):
    assert mine.shape == golden.shape, f"{name} {what}: shape {tuple(mine.shape)} vs {tuple(golden.shape)}"
    diff = (mine - golden).abs().max().item()
    assert torch.allclose(mine, golden, rtol=RTOL, atol=ATOL), f"{name} {what}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_golden_case(name, mode):
    case = _load(name)
    train = mode == "train"
    module = _build(name, case, train)
    inputs = [case["inputs"][k] for k in case["input_order"]]
    originals = [t.clone() for t in inputs]
    hooks = CASES[name][2]
    with torch.set_grad_enabled(train):
        out, captured = _run_with_hooks(module, hooks, inputs)
    for before, after in zip(originals, inputs):
        assert torch.equal(before, after), f"{name}: the forward modified its input"
    _assert_close(name, f"outputs_{mode}", out.detach(), case[f"outputs_{mode}"]["out"])

    golden_inter = case[f"intermediates_{mode}"]
    for key, mine in captured.items():
        assert key in golden_inter, f"{name}: no golden intermediate {key}"
        golden = golden_inter[key]
        _assert_close(name, f"intermediate {key}", mine.reshape(golden.shape), golden)
    expected_hooks = {k for k in golden_inter if k.split("#")[0] in hooks}
    assert set(captured) == expected_hooks

    if train:
        after = dict(case["state_dict"])
        after.update(case["buffers_after_train"])
        expected = CASES[name][1].convert_released_state_dict(after)
        buffers = dict(module.named_buffers())
        for key, value in expected.items():
            if "running_" in key or "num_batches_tracked" in key:
                _assert_close(name, f"buffer {key}", buffers[key].float(), value.float())


def test_mbue_shared_compression_updates_twice_and_dead_tensors_are_dropped():
    case = _load("mbue")
    after = case["buffers_after_train"]
    assert after["compression2.1.num_batches_tracked"].item() == 2
    converted = mbue.convert_released_state_dict(case["state_dict"])
    assert not any(k.startswith(("compression1", "FC13", "FC23")) for k in converted)
    assert "branch1.compress.bn.num_batches_tracked" in converted
    module = _build("mbue", case, train=True)
    with torch.no_grad():
        module(case["inputs"]["x"])
    assert module.branch1.compress.bn.num_batches_tracked.item() == 2
    assert module.branch2.compress_local.bn.num_batches_tracked.item() == 1


def test_csc_cma_ignores_context_by_default():
    case = _load("csc_cma")
    module = _build("csc_cma", case, train=False)
    local, global_, context = (case["inputs"][k] for k in case["input_order"])
    with torch.no_grad():
        a = module(local, global_, context)
        b = module(local, global_, torch.randn_like(context))
        c = module(local, global_)
    assert torch.equal(a, b) and torch.equal(a, c)
