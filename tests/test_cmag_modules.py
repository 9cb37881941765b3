"""CMAG's modules: the graph memory and the circular path against the golden cases of the released
(compiled) code, hand-computed loop edges, the cross-modal attention reconstruction against an
explicit loop, the EMA teacher, float32 / float64, and bitwise state_dict round trips."""
import copy
import io
import math
import os

import pytest
import torch
from torch import nn
from yacs.config import CfgNode as CN

from model.cmag import (CMAGModules, CircularGraphConv, CircularGraphMemory, CrossModalAttention, EMATeacher,
                        GraphMemoryEnhancement, circular_contrastive_loss, circular_contrastive_loss_fixed)
from model.cmag.circular import loop_edges
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag", "cmag_graph_modules.pt")
GRAD_ARGS = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def _weights(out):
    return torch.sin(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)


def _cmag_cfg(**overrides):
    cmag = CN(dict(CMA=True, CMA_MODE="token", CMA_HEADS=2, CMA_GATE_INIT=0.0, GRAPH_MEMORY=True,
                   GRAPH_HIDDEN_DIM=8, GRAPH_MEMORY_SIZE=16, GRAPH_NEIGHBOURS=4, CIRCULAR="off", LR_FACTOR=1.0,
                   CIRCULAR_WEIGHT=0.1, CIRCULAR_TEMPERATURE=0.07, EMA_ALPHA=0.999, EMA_SYNC_BUFFERS=False,
                   EVAL_WITH_EMA=False))
    cmag.merge_from_list([item for key, value in overrides.items() for item in (key, value)])
    return CN(dict(USL=CN(dict(CMAG=cmag))))


# ----------------------------------------------------------------- graph memory (golden)

def test_graph_memory_layers_draw_weights_in_the_released_order(golden):
    case = golden["graph_memory_enhancement"]
    torch.manual_seed(case["seed"])
    module = GraphMemoryEnhancement(**case["init_args"])
    state = module.state_dict()
    assert list(state) == list(case["state_dict"])
    for key, value in case["state_dict"].items():
        assert torch.equal(state[key], value), key


def test_graph_memory_golden_sequence(golden):
    case = golden["graph_memory_enhancement"]
    module = GraphMemoryEnhancement(**case["init_args"])
    module.load_state_dict(case["state_dict"])
    params = dict(module.named_parameters())
    for step, call in enumerate(case["sequence"]):
        module.train(call["mode"] == "train")
        module.zero_grad(set_to_none=True)
        x = call["x"].clone().requires_grad_(True)
        out = module(x)
        assert int(module.memory_ptr) == call["memory_ptr_after"], step
        assert torch.equal(module.memory_features, call["memory_features_after"]), step
        if call["returned_input_unchanged"]:
            assert out is x, step
            continue
        assert out is not x
        assert module.last_top1_not_self == call["rows_whose_top1_is_not_self"], step
        assert len(x) + module.filled_rows() == call["graph_nodes"]
        torch.testing.assert_close(out, call["out"], rtol=1e-5, atol=1e-5)
        (out * _weights(out)).sum().backward()
        torch.testing.assert_close(x.grad, call["x_grad"], **GRAD_ARGS)
        for name, grad in call["param_grads"].items():
            torch.testing.assert_close(params[name].grad, grad, **GRAD_ARGS, msg=lambda m, n=name: n + ": " + m)
        assert all(p.grad is None for p in module.edge_encoder.parameters())


def test_graph_memory_fifo_and_fill_level():
    module = GraphMemoryEnhancement(3, hidden_dim=4, memory_size=4).train()
    assert module.fill_level() == 0.0
    rows = torch.arange(18, dtype=torch.float32).reshape(6, 3)
    module(rows[:3], labels=torch.tensor([7, 8, 9]))
    assert module.fill_level() == 0.75 and isinstance(module.fill_level(), float)
    module(rows[3:])
    # slots 3, 0, 1 get rows 3, 4, 5; labels stay where they were written
    assert torch.equal(module.memory_features, rows[[4, 5, 2, 3]])
    assert module.memory_indices.tolist() == [7, 8, 9, 0]
    assert int(module.memory_ptr) == 6 and module.fill_level() == 1.0
    big = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    module(big)  # ptr 6: rows 0..9 go to slots 2, 3, 0, 1, 2, 3, 0, 1, 2, 3; the last writes win
    assert torch.equal(module.memory_features, big[[6, 7, 8, 9]])
    assert int(module.memory_ptr) == 16


def test_graph_memory_no_gradient_into_memory_rows_and_none_through_adjacency():
    torch.manual_seed(0)
    module = GraphMemoryEnhancement(6, hidden_dim=5, memory_size=12).eval()
    module.memory_features.copy_(torch.randn(12, 6))
    module.memory_ptr.fill_(12)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    module.double()
    # with A fixed by the indices, the output is a smooth function of x: gradcheck passes
    assert torch.autograd.gradcheck(lambda inp: module(inp), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_memory_runs_in_float32_and_float64(dtype):
    torch.manual_seed(1)
    module = GraphMemoryEnhancement(8, hidden_dim=6, memory_size=10)
    memory = torch.randn(10, 8)
    module.memory_features.copy_(memory)
    module.memory_ptr.fill_(10)
    x = torch.randn(4, 8)
    reference = module.eval()(x).detach()
    module = module.to(dtype)
    out = module(x.to(dtype))
    assert out.dtype == dtype and module.memory_features.dtype == dtype
    torch.testing.assert_close(out.double(), reference.double(), rtol=1e-5, atol=1e-5)
    module.train()
    out = module(x.to(dtype).requires_grad_(True))
    out.sum().backward()
    assert torch.isfinite(out).all() and module.node_encoder.weight.grad.dtype == dtype


# ----------------------------------------------------------------- circular path (golden + hand cases)

def _circle(degrees):
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_loop_edges_hand_computed():
    features = _circle([0, 10, 25, 90])
    similarity = features.mm(features.t())
    one_label = loop_edges(similarity, torch.zeros(4, dtype=torch.int64))
    # row 0 -> (1, 2, 3), row 1 -> (0, 2, 3), row 2 -> (1, 0, 3), row 3 -> (2, 1, 0): every
    # ordered pair but (1, 3) closes or chains a loop
    expected = torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)
    expected[1, 3] = 0
    assert torch.equal(one_label, expected)
    two_labels = loop_edges(similarity, torch.tensor([0, 0, 0, 1]))
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[:3, :3] = 1 - torch.eye(3, dtype=torch.float64)
    assert torch.equal(two_labels, expected)


def test_circular_loss_as_compiled_golden(golden):
    case = golden["circular_contrastive_loss"]
    for name, expected in case["cases"].items():
        x = case["features"].clone().requires_grad_(True)
        loss = circular_contrastive_loss(x, expected["labels"], case["temperature"])
        loss.backward()
        assert bool(torch.isnan(loss)) == expected["is_nan"], name
        assert bool(torch.isnan(x.grad).any()) == expected["grad_has_nan"], name
        torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(x.grad, expected["x_grad"], **GRAD_ARGS, equal_nan=True)
    assert case["cases"]["three_labels"]["is_nan"]


def _fixed_loss_loop_reference(features, labels, temperature, loop_weight=0.5):
    """Explicit per-pair float64 loops over the loop edges (C from the hand-checked loop_edges)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    s = (f @ f.t()).tolist()
    loops = loop_edges(torch.tensor(s), labels).tolist()
    n = len(s)
    total, count = 0.0, 0
    for i in range(n):
        den = sum((1 + loop_weight * loops[i][j]) * math.exp(s[i][j] / temperature) for j in range(n) if j != i)
        for j in range(n):
            if loops[i][j]:
                total -= math.log((1 + loop_weight) * math.exp(s[i][j] / temperature) / den)
                count += 1
    return total / count


def test_circular_loss_fixed_is_finite_with_gradients_and_matches_a_loop(golden):
    case = golden["circular_contrastive_loss"]
    one = case["cases"]["all_one_label"]
    x = case["features"].clone()
    # with a single label there are no negatives to add: the released value
    torch.testing.assert_close(circular_contrastive_loss_fixed(x, one["labels"], case["temperature"]), one["loss"],
                               rtol=1e-5, atol=1e-6)
    labels = case["cases"]["three_labels"]["labels"]
    for dtype in (torch.float32, torch.float64):
        x = case["features"].detach().clone().to(dtype).requires_grad_(True)
        loss = circular_contrastive_loss_fixed(x, labels, case["temperature"])
        loss.backward()
        assert loss.dtype == dtype and torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0
        assert loss.item() == pytest.approx(_fixed_loss_loop_reference(case["features"], labels, 0.07), rel=1e-5)


def test_circular_loss_fixed_without_loops_is_a_connected_zero():
    x = torch.randn(4, 3, requires_grad=True)
    loss = circular_contrastive_loss_fixed(x, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(4, 3))


def test_circular_graph_memory_as_compiled_raises_and_writes_every_other_slot(golden):
    case = golden["circular_graph_memory"]
    torch.manual_seed(0)
    module = CircularGraphMemory(**case["init_args"]).train()
    x_rgb, x_ir = torch.randn(6, 16), torch.randn(6, 16)
    expected_type, expected_message = case["train_call_with_labels_raises"].split(": ", 1)
    with pytest.raises(RuntimeError) as error:
        module(x_rgb, x_ir, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert type(error.value).__name__ == expected_type and str(error.value) == expected_message
    written = torch.nonzero(module.memory_features.abs().sum(dim=1)).flatten().tolist()
    assert written == case["memory_slots_written_by_the_failed_call"]
    assert int(module.memory_ptr) == case["memory_ptr_after"]
    batch = torch.cat([x_rgb, x_ir])
    rows = module.memory_features[written]
    assert sorted(rows.sum(1).tolist()) == sorted(batch.sum(1).tolist())


def test_circular_graph_memory_as_compiled_returns_inputs_below_ten_rows():
    module = CircularGraphMemory(4, hidden_dim=3, memory_size=20).train()
    x_rgb, x_ir = torch.randn(2, 4), torch.randn(2, 4)
    out_rgb, out_ir = module(x_rgb, x_ir, [0, 1], [0, 1])
    assert torch.equal(out_rgb, x_rgb) and torch.equal(out_ir, x_ir)
    assert module.fill_level() == pytest.approx(4 / 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_circular_graph_memory_fixed_runs_with_gradients(dtype):
    torch.manual_seed(2)
    module = CircularGraphMemory(6, hidden_dim=5, memory_size=8, num_neighbours=3, variant="fixed").to(dtype).train()
    for step in range(3):
        x_rgb = torch.randn(4, 6, dtype=dtype, requires_grad=True)
        x_ir = torch.randn(3, 6, dtype=dtype, requires_grad=True)
        before = module.memory_features.clone()
        out_rgb, out_ir = module(x_rgb, x_ir, [0, 0, 1, 1], [3, 3, 4])
        assert out_rgb.shape == (4, 6) and out_ir.shape == (3, 6) and out_rgb.dtype == dtype
        (out_rgb.sum() + out_ir.sum()).backward()
        assert torch.isfinite(x_rgb.grad).all() and x_ir.grad.abs().sum() > 0
        assert module.conv1.circular.weight.grad.abs().sum() > 0
        # the batch is written after use, to consecutive slots
        slots = [(7 * step + i) % 8 for i in range(7)]
        assert torch.equal(module.memory_features[slots], torch.cat([x_rgb, x_ir]).detach())
        untouched = [s for s in range(8) if s not in slots]
        assert torch.equal(module.memory_features[untouched], before[untouched])
        module.zero_grad()


def test_circular_graph_conv_cycle_adjacency_by_hand():
    # a triangle 0-1-2 and a pendant edge 2-3; A^3 counts the 3-step walks between the ends of
    # each edge: (0,1) 3, (0,2) 4, (1,2) 4, (2,3) 3
    a = torch.zeros(4, 4)
    for i, j in [(0, 1), (1, 2), (0, 2), (2, 3)]:
        a[i, j] = a[j, i] = 1
    expected = torch.tensor([[0, 3, 4, 0], [3, 0, 4, 0], [4, 4, 0, 3], [0, 0, 3, 0]], dtype=torch.float32)
    expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(CircularGraphConv.cycle_adjacency(a), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------- cross-modal attention

def _attention_loop_reference(module, query, context):
    """Explicit loops over tokens, heads and rows, from the module's own weights (float64)."""
    k_tokens, width, heads = module.num_tokens, module.width, module.num_heads
    dh = width // heads
    ln = module.norm

    def project(linear, rows):
        return [[linear(ln(r[t * width:(t + 1) * width])) for t in range(k_tokens)] for r in rows]

    q, k, v = project(module.query, query), project(module.key, context), project(module.value, context)
    out = torch.zeros_like(query)
    for i in range(len(query)):
        for t in range(k_tokens):
            mixed = []
            for h in range(heads):
                part = slice(h * dh, (h + 1) * dh)
                scores = [float(q[i][t][part] @ k[j][t][part]) / math.sqrt(dh) for j in range(len(context))]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                mixed.append(sum(w / sum(weights) * v[j][t][part] for j, w in enumerate(weights)))
            out[i, t * width:(t + 1) * width] = module.out(torch.cat(mixed))
    return query + module.gate * out


@pytest.mark.parametrize("mode", ["token", "vector"])
def test_cma_starts_as_identity_and_trains_only_its_gate_first(mode):
    torch.manual_seed(3)
    cma = CrossModalAttention(12, num_tokens=3, mode=mode, num_heads=2)
    query = torch.randn(5, 12, requires_grad=True)
    context = torch.randn(4, 12, requires_grad=True)
    out = cma(query, context)
    assert torch.equal(out, query)
    (out * _weights(out)).sum().backward()
    assert torch.equal(query.grad, _weights(out)) and torch.equal(context.grad, torch.zeros(4, 12))
    assert cma.gate.grad.abs() > 0 and cma.query.weight.grad.abs().sum() == 0
    assert isinstance(cma.gate_value(), float) and cma.gate_value() == 0.0
    assert all(p.requires_grad for p in cma.parameters())


@pytest.mark.parametrize("mode", ["token", "vector"])
def test_cma_matches_an_explicit_loop_in_float64(mode):
    torch.manual_seed(4)
    cma = CrossModalAttention(12, num_tokens=3, mode=mode, num_heads=2, gate_init=0.7).double()
    query, context = torch.randn(4, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cma(query, context), _attention_loop_reference(cma, query, context),
                                   rtol=1e-10, atol=1e-10)
    query, context = query[:2].requires_grad_(True), context[:3].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, c: cma(q, c), (query, context))


def test_cma_token_mode_keeps_tokens_apart_and_float32_agrees_with_float64():
    torch.manual_seed(5)
    cma = CrossModalAttention(12, num_tokens=3, mode="token", num_heads=2, gate_init=1.0)
    query, context = torch.randn(4, 12), torch.randn(6, 12)
    changed = context.clone()
    changed[:, 4:8] = torch.randn(6, 4)  # token 1 of every context row
    out, out_changed = cma(query, context), cma(query, changed)
    assert torch.equal(out[:, :4], out_changed[:, :4]) and torch.equal(out[:, 8:], out_changed[:, 8:])
    assert not torch.allclose(out[:, 4:8], out_changed[:, 4:8])
    out64 = copy.deepcopy(cma).double()(query.double(), context.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)


def test_cma_says_it_is_a_reconstruction():
    cma = CrossModalAttention(8, num_tokens=2, num_heads=2)
    for text in (cma.describe(), repr(cma)):
        assert "cma_reconstructed" in text and "reconstruction" in text and "not" in text
    with pytest.raises(ValueError, match="num_heads"):
        CrossModalAttention(8, num_tokens=2, num_heads=3)


# ----------------------------------------------------------------- EMA teacher

class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_ema_averages_parameters_only_and_is_frozen():
    torch.manual_seed(6)
    student = _Student()
    ema = EMATeacher(student, alpha=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert not any(p.requires_grad for p in ema.parameters())
    student(torch.randn(8, 3))  # moves the student's running statistics
    with torch.no_grad():
        student.fc.weight.add_(1.0)
    ema.update(student)
    expected = 0.9 * start["fc.weight"] + (1 - 0.9) * student.fc.weight.detach()
    torch.testing.assert_close(ema.module.fc.weight, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ema.module.fc.bias, start["fc.bias"], rtol=0, atol=1e-7)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(ema.module.state_dict()[name], start[name]), name
    synced = EMATeacher(student, alpha=0.9, sync_buffers=True)
    synced.module.bn.running_mean.zero_()
    synced.update(student)
    assert torch.equal(synced.module.bn.running_mean, student.bn.running_mean)
    assert ema.evaluation_model(student) is student
    assert EMATeacher(student, evaluate=True).evaluation_model(student) is not student


def test_ema_from_config_and_alpha_check():
    ema = EMATeacher.from_config(_cmag_cfg(EVAL_WITH_EMA=True), _Student())
    assert ema.alpha == 0.999 and ema.evaluate
    with pytest.raises(ConfigError, match="USL.CMAG.EMA_ALPHA"):
        EMATeacher.from_config(_cmag_cfg(EMA_ALPHA=1.5), _Student())


# ----------------------------------------------------------------- container, config, state

def test_cmag_modules_from_config_and_errors_name_the_key():
    modules = CMAGModules.from_config(_cmag_cfg(), feature_dim=12, num_tokens=3)
    assert isinstance(modules.cma, CrossModalAttention) and isinstance(modules.graph_memory, GraphMemoryEnhancement)
    assert modules.circular_memory is None
    assert modules.monitor() == {"graph_fill": 0.0, "graph_top1_not_self": 0.0, "cma_gate": 0.0}
    assert any("reconstruction" in line for line in modules.describe())
    group, = modules.param_groups()
    assert group["name"] == "cmag" and len(group["params"]) == len(list(modules.parameters()))
    circular = CMAGModules.from_config(_cmag_cfg(CIRCULAR="fixed"), feature_dim=12, num_tokens=3)
    assert circular.graph_memory is None and circular.circular_memory.variant == "fixed"
    for key, value in [("CIRCULAR", "on"), ("CMA_MODE", "tokens"), ("CMA_HEADS", 5), ("GRAPH_MEMORY_SIZE", 0)]:
        with pytest.raises(ConfigError, match="USL.CMAG." + key):
            CMAGModules.from_config(_cmag_cfg(**{key: value}), feature_dim=12, num_tokens=3)


def test_cmag_modules_enhance_order_and_dtype():
    torch.manual_seed(7)
    modules = CMAGModules.build(12, 3, cma_heads=2, cma_gate_init=0.5, graph_hidden_dim=6, graph_memory_size=40,
                                graph_neighbours=3).train()
    reference = copy.deepcopy(modules)
    f_rgb, f_ir = torch.randn(6, 12), torch.randn(5, 12)
    out_rgb, out_ir = modules.enhance(f_rgb, f_ir)
    a_rgb, a_ir = reference.cma(f_rgb, f_ir), reference.cma(f_ir, f_rgb)
    expected_rgb = reference.graph_memory(a_rgb)
    expected_ir = reference.graph_memory(a_ir)
    assert torch.equal(out_rgb, expected_rgb) and torch.equal(out_ir, expected_ir)
    # one memory for both modalities, RGB rows first
    assert torch.equal(modules.graph_memory.memory_features[:11], torch.cat([a_rgb, a_ir]).detach())
    assert modules.monitor()["graph_fill"] == pytest.approx(11 / 40)
    out64 = copy.deepcopy(reference).double().enhance(f_rgb.double(), f_ir.double())
    assert out64[0].dtype == torch.float64


def _state_bytes(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("circular", ["off", "fixed"])
def test_cmag_state_round_trips_bitwise(circular):
    torch.manual_seed(8)
    modules = CMAGModules.build(12, 3, cma_heads=2, cma_gate_init=0.25, graph_hidden_dim=6, graph_memory_size=9,
                                graph_neighbours=3, circular=circular).train()
    modules.enhance(torch.randn(4, 12), torch.randn(3, 12), [0, 0, 1, 1], [0, 1, 1])
    buffer = io.BytesIO()
    torch.save(modules.state_dict(), buffer)
    buffer.seek(0)
    fresh = CMAGModules.build(12, 3, cma_heads=2, graph_hidden_dim=6, graph_memory_size=9, graph_neighbours=3,
                              circular=circular)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _state_bytes(fresh) == _state_bytes(modules)
    memory = fresh.circular_memory if circular != "off" else fresh.graph_memory
    assert int(memory.memory_ptr) == 7 and fresh.cma.gate_value() == 0.25


def test_cmag_modules_run_in_their_own_dtype_under_autocast():
    torch.manual_seed(9)
    modules = CMAGModules.build(12, 3, cma_heads=2, cma_gate_init=0.5, graph_hidden_dim=6, graph_memory_size=40,
                                graph_neighbours=3).eval()
    modules.graph_memory.write(torch.randn(8, 12))
    f_rgb, f_ir = torch.randn(4, 12).bfloat16(), torch.randn(3, 12).bfloat16()
    expected = modules.enhance(f_rgb.float(), f_ir.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = modules.enhance(f_rgb, f_ir)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
