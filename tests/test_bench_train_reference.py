"""The released-model reference of benchmarks/bench_train.py is faithful: each of its block
forwards reproduces the released code's golden outputs (tests/golden/*.pt, train mode) on the
parameters of this project's block, the context convs it adds are the released FC13/FC23, and
on a whole (small) CMFN its training loss and gradients equal this project's step."""
import importlib.util
from pathlib import Path

import pytest
import torch

from model.cmfn import csc_cma, dilated_bottleneck, global_block, hce, irmlp, local_block, mbue, mfa, wtconv

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
RTOL, ATOL = 1e-5, 2e-5  # the golden README's float32 tolerances


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _case(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def _block(name, case):
    a = case["init_args"]
    builders = {
        "hce_a": lambda: hce.HCE(a["in_planes"], a["inter_planes"], a["out_planes"], tuple(a["dilation"])),
        "hce_b": lambda: hce.HCE(a["in_planes"], a["inter_planes"], a["out_planes"], tuple(a["dilation"])),
        "mfa_flag0": lambda: mfa.MFA(a["high_dim"], a["low_dim"], downsample=False),
        "mfa_flag1": lambda: mfa.MFA(a["high_dim"], a["low_dim"], downsample=True),
        "layer5": lambda: dilated_bottleneck.DilatedBottleneck(a["inplanes"], a["planes"], a["dilation"]),
        "wtconv": lambda: wtconv.WTConv2d(a["in_channels"], a["kernel_size"]),
        "local_block": lambda: local_block.LocalBlock(a["dim"]),
        "global_block": lambda: global_block.GlobalBlock(a["dim"], a["num_heads"], a["window_size"],
                                                         a["shift_size"], a["mlp_ratio"], drop_path=0.0),
        "csc_cma": lambda: csc_cma.CSCCMA(a["ch_1"], a["num_heads"]),
        "irmlp": lambda: irmlp.IRMLP(a["inp_dim"], a["out_dim"]),
        "mbue": lambda: mbue.MBUE(a["channel"], a["dim"], a["num_heads"], a["window_size"], a["shift_size"],
                                  a["mlp_ratio"], drop_path=0.0, dropout=0.0),
    }
    converters = {"hce_a": hce, "hce_b": hce, "mfa_flag0": mfa, "mfa_flag1": mfa, "layer5": dilated_bottleneck,
                  "wtconv": wtconv, "local_block": local_block, "global_block": global_block,
                  "csc_cma": csc_cma, "irmlp": irmlp, "mbue": mbue}
    block = builders[name]()
    block.load_state_dict(converters[name].convert_released_state_dict(case["state_dict"]), strict=True)
    return block.train()


REFERENCE = {
    "hce_a": lambda m, x: bench.released_hce(m, x),
    "hce_b": lambda m, x: bench.released_hce(m, x),
    "mfa_flag0": lambda m, x_h, x_l: bench.released_mfa(m, x_h, x_l, 1),
    "mfa_flag1": lambda m, x_h, x_l: bench.released_mfa(m, x_h, x_l, 2),
    "layer5": bench.released_dilated_bottleneck,
    "wtconv": bench.released_wtconv,
    "local_block": bench.released_local_block,
    "global_block": bench.released_global_block,
    "global_block_regdb_like": bench.released_global_block,
    "csc_cma": lambda m, local, global_, context: bench.released_csc_cma(m, local, global_),
    "irmlp": bench.released_irmlp,
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_block_reproduces_the_released_golden_output(name):
    case = _case(name)
    block = _block("global_block" if name.startswith("global_block") else name, case)
    inputs = [case["inputs"][k] for k in case["input_order"]]
    with torch.no_grad():
        out = REFERENCE[name](block, *inputs)
    golden = case["outputs_train"]["out"]
    assert out.shape == golden.shape
    assert torch.allclose(out, golden, rtol=RTOL, atol=ATOL), (out - golden).abs().max().item()


def test_reference_mbue_computes_the_released_context_convs_and_output():
    case = _case("mbue")
    block = _block("mbue", case)
    a = case["init_args"]
    contexts, outputs = [], []
    for key in ("FC13", "FC23"):
        conv = torch.nn.Conv2d(a["channel"], a["dim"], 3, padding=1, bias=False)
        conv.weight.data.copy_(case["state_dict"][key + ".weight"])
        conv.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
        contexts.append(conv)
    with torch.no_grad():
        out = bench.released_mbue(block, contexts, case["inputs"]["x"])
    golden = case["outputs_train"]["out"]
    assert torch.allclose(out, golden, rtol=RTOL, atol=ATOL), (out - golden).abs().max().item()
    for key, mine in zip(("FC13", "FC23"), outputs):
        assert torch.allclose(mine, case["intermediates_train"][key], rtol=RTOL, atol=ATOL), key


def test_reference_step_has_the_project_loss_and_gradients(one_thread):
    from engine.solver import build_optimizer
    from loss import build_criterion
    from model import build_model
    from utils.config import build_config

    cfg = build_config("sysu", opts=["MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False"])
    torch.manual_seed(0)
    model = build_model(cfg, 6).train()
    reference = bench.ReleasedForward(model).train()
    calls = []
    for conv in reference.context_convs:
        conv.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    criterion = build_criterion(cfg)
    device = torch.device("cpu")
    batch = bench.make_batch(2, 2, (64, 32), device, 0)
    ref_step = bench.Step("reference_fp32", reference, bench.released_optimizer(reference, cfg), criterion, batch,
                          False, False, device)
    project_step = bench.Step("project_fp32", model, build_optimizer(cfg, model), criterion, batch, False, False,
                              device)
    check = bench.check_same_loss(ref_step, project_step, model, seed=3)
    assert calls == [(8, 64, 4, 2), (8, 64, 4, 2)]  # both dead context convs ran, C -> C/4 at H/16
    assert check["same_parameters_get_gradients"]
    assert check["rel_diff"] < 1e-5, check
    assert check["grad_rel_l2_diff"] < 1e-3, check
    assert check["reference_loss"] > 1.0  # every term on: not a trivially small loss
