"""CMAG's stage-2 loss composition: against the released trainer iteration (golden, with the
attention at its initial identity), against TokenMatcher's loss on hand-enhanced features, the
circular term in both variants, and a bitwise resume across all CMAG state."""
import copy
import io
import os

import pytest
import torch
from torch import nn
from yacs.config import CfgNode as CN

from cluster.dtnl import NeighbourSets
from cluster.matching import ClusterMatch
from loss.cmag import CMAGStage2Loss
from loss.tokenmatcher import Stage2Loss, Stage2Memories
from model.cmag import CMAGModules, EMATeacher
from model.cmag.circular import circular_contrastive_loss_fixed
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag", "trainer_stage2_iteration.pt")
BANK_NAMES = {"memory_ir": "mixed_ir", "memory_rgb": "mixed_rgb", "memory_IR": "modality_ir",
              "memory_RGB": "modality_rgb", "memory_ins_ir": "instance_ir", "memory_ins_rgb": "instance_rgb"}


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


class StubEncoder(nn.Module):
    """The golden's stub encoder: a Linear stem per modality (24 -> 32), tanh, a shared Linear,
    K = 4 tokens of C = 8, a BatchNorm1d per token with a frozen bias (the tanh is what reproduces
    the stored losses). Returns (feat [N, 32] of RGB rows then IR rows, raw tokens [N, 4, 8])."""

    def __init__(self, state):
        super().__init__()
        self.vis, self.th, self.shared = nn.Linear(24, 32), nn.Linear(24, 32), nn.Linear(32, 32)
        self.bns = nn.ModuleList(nn.BatchNorm1d(8) for _ in range(4))
        for bn in self.bns:
            bn.bias.requires_grad_(False)
        self.load_state_dict(state)

    def forward(self, x_rgb, x_ir):
        hidden = torch.cat([self.vis(x_rgb.flatten(1)), self.th(x_ir.flatten(1))])
        tokens = self.shared(torch.tanh(hidden)).view(len(hidden), 4, 8)
        return torch.cat([bn(tokens[:, i]) for i, bn in enumerate(self.bns)], dim=1), tokens


def _stage2_parts(case):
    inputs = case["inputs"]
    memories = Stage2Memories.from_banks({BANK_NAMES[k]: v.clone() for k, v in inputs["banks_before"].items()})
    mirror = not isinstance(next(iter(case["i2r"].values())), list)
    match = ClusterMatch(dict(case["r2i"]), dict(case["i2r"]), mirror, torch.zeros(1), torch.zeros(1, 1))
    neighbours = NeighbourSets(ir=inputs["topk_ir"], rgb=inputs["topk_rgb"], i2r=inputs["topk_i2r"],
                               r2i=inputs["topk_r2i"])
    lambdas = case["lambdas"]
    loss = Stage2Loss(lambdas["neighbor"], lambdas["cross"], lambdas["mate"], lambdas["mate"],
                      lookup_by_camera="regdb" in case["tag"])
    return memories, match, neighbours, loss


def _batch(case):
    inputs = case["inputs"]
    x_rgb = torch.cat([inputs["rgb_images"], inputs["rgb_images_view2"]])
    return dict(x_rgb=x_rgb, x_ir=inputs["ir_images"], labels_ir=list(inputs["ir_labels"]),
                labels_rgb=list(inputs["rgb_labels"]) * 2, index_ir=list(inputs["ir_indexes"]),
                index_rgb=list(inputs["rgb_indexes"]) * 2)


def _call(criterion, epoch, memories, match, neighbours, encoder, batch):
    feat, tokens = encoder(batch["x_rgb"], batch["x_ir"])
    rows = len(batch["x_rgb"])
    return criterion(epoch, memories, match, feat[rows:], feat[:rows], batch["labels_ir"], batch["labels_rgb"],
                     tokens[rows:], tokens[:rows], neighbours=neighbours, index_ir=batch["index_ir"],
                     index_rgb=batch["index_rgb"], camid_ir=[0] * len(batch["labels_ir"]),
                     camid_rgb=[0] * rows)


def _sgd(encoder, lr=0.1):
    return torch.optim.SGD([{"params": [p]} for p in encoder.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                           weight_decay=5e-4)


def test_golden_trainer_iteration_with_the_attention_at_its_initial_gate(golden):
    for case in golden["cases"]:
        torch.manual_seed(0)
        encoder = StubEncoder(case["stub"]["state_dict_before"]).train()
        memories, match, neighbours, stage2 = _stage2_parts(case)
        modules = CMAGModules.build(32, 4, cma_heads=2, graph_memory=False)
        criterion = CMAGStage2Loss(stage2, modules)
        optimizer = _sgd(encoder)
        optimizer.zero_grad()
        total, terms, info = _call(criterion, case["epoch"], memories, match, neighbours, encoder, _batch(case))
        breakdown = case["loss_breakdown"]
        assert total.item() == pytest.approx(breakdown["total"], rel=1e-5)
        for name, key in [("cluster_ir", "loss_ir"), ("cluster_rgb", "loss_rgb"), ("diversity", "diversity"),
                          ("mate", "mate")]:
            assert terms[name] == pytest.approx(breakdown[key], rel=1e-5), (case["tag"], name)
        assert terms["neighbour"] == pytest.approx(sum(breakdown["neighbour_terms"]), rel=1e-5)
        assert terms["cross"] == pytest.approx(sum(breakdown["cross_terms"]), rel=1e-5)
        assert "circular" not in terms and info["cma_gate"] == 0.0 and info["graph_fill"] == 0.0
        total.backward()
        params = dict(encoder.named_parameters())
        for name, grad in case["outputs"]["grads"].items():
            torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-5)
        assert modules.cma.gate.grad.abs() > 0
        optimizer.step()
        for name, value in case["outputs"]["state_dict_after_step"].items():
            torch.testing.assert_close(encoder.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        banks = memories.banks()
        for name, bank in case["outputs"]["banks_after"].items():
            torch.testing.assert_close(banks[BANK_NAMES[name]], bank, rtol=1e-5, atol=1e-6)


def test_composition_equals_tokenmatcher_loss_on_hand_enhanced_features(golden):
    case = golden["cases"][1]
    torch.manual_seed(1)
    encoder = StubEncoder(case["stub"]["state_dict_before"]).train()
    modules = CMAGModules.build(32, 4, cma_heads=2, cma_gate_init=0.3, graph_hidden_dim=6, graph_memory_size=64,
                                graph_neighbours=4).train()
    modules.graph_memory.write(torch.randn(10, 32))
    memories, match, neighbours, stage2 = _stage2_parts(case)
    ref_modules, ref_encoder = copy.deepcopy(modules), copy.deepcopy(encoder)
    ref_memories = copy.deepcopy(memories)
    batch = _batch(case)

    total, terms, info = _call(CMAGStage2Loss(stage2, modules), case["epoch"], memories, match, neighbours, encoder,
                               batch)
    total.backward()

    feat, tokens = ref_encoder(batch["x_rgb"], batch["x_ir"])
    rows = len(batch["x_rgb"])
    a_rgb = ref_modules.cma(feat[:rows], feat[rows:])
    a_ir = ref_modules.cma(feat[rows:], feat[:rows])
    g_rgb = ref_modules.graph_memory(a_rgb)
    g_ir = ref_modules.graph_memory(a_ir)
    ref_total, ref_terms, _ = stage2(case["epoch"], ref_memories, match, g_ir, g_rgb, batch["labels_ir"],
                                     batch["labels_rgb"], tokens[rows:], tokens[:rows], neighbours=neighbours,
                                     index_ir=batch["index_ir"], index_rgb=batch["index_rgb"])
    ref_total.backward()
    assert torch.equal(total, ref_total) and terms == ref_terms
    assert info["graph_fill"] == pytest.approx((10 + 16) / 64) and info["cma_gate"] == pytest.approx(0.3)
    for (name, p), q in zip(modules.named_parameters(), ref_modules.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    assert modules.graph_memory.node_encoder.weight.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(memories.banks().values(), ref_memories.banks().values()))
    assert torch.equal(modules.graph_memory.memory_features, ref_modules.graph_memory.memory_features)


def _labels_and_features(seed, rows_rgb=4, rows_ir=4, dim=12):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows_rgb, dim, generator=generator), torch.randn(rows_ir, dim, generator=generator))


class _RecordingStage2:
    """A stage-2 loss stand-in: the squared features, recording what it was given."""

    def __call__(self, epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb, tokens_ir, tokens_rgb, **lookup):
        self.seen = (f_ir, f_rgb, lookup)
        total = f_ir.pow(2).mean() + f_rgb.pow(2).mean()
        return total, {"squares": total.item(), "total": total.item()}, {"lambda_x": 1.0}


def _match():
    # regular branch: RGB clusters 0, 1 -> IR 0; RGB 2 -> IR 1
    return ClusterMatch({0: 0, 1: 0, 2: 1}, {0: [0, 1], 1: [2]}, False, torch.zeros(2), torch.zeros(3, 2))


def test_circular_as_compiled_is_nan_while_its_memory_is_short_then_stops_with_a_config_error():
    torch.manual_seed(2)
    modules = CMAGModules.build(12, 3, cma_heads=2, graph_hidden_dim=6, graph_memory_size=30, circular="as_compiled")
    criterion = CMAGStage2Loss(_RecordingStage2(), modules.train(), lambda_graph=0.1)
    f_rgb, f_ir = _labels_and_features(0)
    # 8 rows < 10: the inputs pass through and the released loss sees two labels per modality
    total, terms, info = criterion(0, None, _match(), f_ir, f_rgb, [0, 0, 1, 1], [0, 0, 2, 2], None, None)
    assert torch.isnan(total) and terms["circular"] != terms["circular"]
    assert info["lambda_graph"] == 0.1 and info["graph_fill"] == pytest.approx(8 / 30)
    with pytest.raises(ConfigError, match="USL.CMAG.CIRCULAR as_compiled"):
        criterion(0, None, _match(), f_ir, f_rgb, [0, 0, 1, 1], [0, 0, 2, 2], None, None)


def test_circular_as_compiled_single_label_is_finite_and_mirror_branch_is_refused():
    modules = CMAGModules.build(12, 3, cma_heads=2, graph_hidden_dim=6, graph_memory_size=30, circular="as_compiled")
    criterion = CMAGStage2Loss(_RecordingStage2(), modules.train())
    f_rgb, f_ir = _labels_and_features(1, rows_rgb=3, rows_ir=3)
    total, terms, _ = criterion(0, None, None, f_ir, f_rgb, [0, 0, 0], [1, 1, 1], None, None)
    assert torch.isfinite(total) and terms["total"] == pytest.approx(terms["squares"] + 0.1 * terms["circular"])
    mirror = ClusterMatch({0: [0, 1]}, {0: 0, 1: 0}, True, torch.zeros(1), torch.zeros(2, 1))
    fresh = CMAGStage2Loss(_RecordingStage2(), CMAGModules.build(12, 3, cma_heads=2, graph_hidden_dim=6,
                                                                   graph_memory_size=30, circular="as_compiled"))
    with pytest.raises(ConfigError, match="mirror branch"):
        fresh(0, None, mirror, f_ir, f_rgb, [0, 1, 1], [0, 0, 0], None, None)


def test_circular_fixed_term_is_finite_with_gradients_and_composed_as_documented():
    torch.manual_seed(3)
    modules = CMAGModules.build(12, 3, cma_heads=2, cma_gate_init=0.2, graph_hidden_dim=6, graph_memory_size=40,
                                graph_neighbours=3, circular="fixed").train()
    reference = copy.deepcopy(modules)
    stage2 = _RecordingStage2()
    criterion = CMAGStage2Loss(stage2, modules, lambda_graph=0.5)
    f_rgb, f_ir = _labels_and_features(2, rows_rgb=6, rows_ir=5)
    f_rgb.requires_grad_(True)
    labels_rgb, labels_ir = [0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1]
    for step in range(2):
        total, terms, info = criterion(step, None, _match(), f_ir, f_rgb, labels_ir, labels_rgb, None, None,
                                       neighbours="passed through")
        assert torch.isfinite(total) and stage2.seen[2] == {"neighbours": "passed through"}
        e_rgb, e_ir = reference.enhance(f_rgb, f_ir, labels_rgb, labels_ir)
        torch.testing.assert_close(stage2.seen[1], e_rgb, rtol=0, atol=0)
        partners = torch.tensor([0, 0, 0, 0, 0, 1])
        expected = (circular_contrastive_loss_fixed(e_rgb, torch.tensor(labels_rgb))
                    + circular_contrastive_loss_fixed(e_ir, torch.tensor(labels_ir))
                    + circular_contrastive_loss_fixed(torch.cat([e_rgb, e_ir]),
                                                      torch.cat([partners, torch.tensor(labels_ir)])))
        assert terms["circular"] == pytest.approx(expected.item(), rel=1e-6) and terms["circular"] > 0
        assert terms["total"] == pytest.approx(terms["squares"] + 0.5 * terms["circular"], rel=1e-6)
        modules.zero_grad()
        total.backward()
        assert torch.isfinite(f_rgb.grad).all()
        for name in ("cma.gate", "circular_memory.conv2.combine.weight", "circular_memory.node_encoder.weight"):
            grad = dict(modules.named_parameters())[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert info["graph_fill"] == pytest.approx(22 / 40)


def test_zero_weight_from_config_skips_the_circular_term():
    cfg = CN(dict(USL=CN(dict(CMAG=CN(dict(CIRCULAR_WEIGHT=0.0, CIRCULAR_TEMPERATURE=0.5))))))
    modules = CMAGModules.build(12, 3, cma_heads=2, graph_hidden_dim=6, graph_memory_size=40, circular="fixed")
    criterion = CMAGStage2Loss.from_config(cfg, _RecordingStage2(), modules)
    assert criterion.temperature == 0.5
    f_rgb, f_ir = _labels_and_features(3)
    total, terms, info = criterion(0, None, _match(), f_ir, f_rgb, [0, 0, 1, 1], [0, 0, 1, 1], None, None)
    assert "circular" not in terms and total.item() == pytest.approx(terms["squares"])
    assert info["lambda_graph"] == 0.0 and info["lambda_x"] == 1.0


def _save(objects):
    buffer = io.BytesIO()
    torch.save({name: obj.state_dict() for name, obj in objects.items()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _flat_state(objects):
    state = {}
    for name, obj in objects.items():
        for key, value in obj.state_dict().items():
            state[name + "." + key] = value
    return state


@pytest.mark.parametrize("circular", ["off", "fixed"])
def test_resume_across_cmag_state_is_bitwise(golden, circular):
    case = golden["cases"][0]
    batch = _batch(case)

    def fresh():
        torch.manual_seed(4)
        encoder = StubEncoder(case["stub"]["state_dict_before"]).train()
        modules = CMAGModules.build(32, 4, cma_heads=2, cma_gate_init=0.1, graph_hidden_dim=6, graph_memory_size=40,
                                    graph_neighbours=4, circular=circular).train()
        memories, match, neighbours, stage2 = _stage2_parts(case)
        optimizer = torch.optim.SGD([{"params": [p]} for p in encoder.parameters() if p.requires_grad]
                                    + [{"params": g["params"]} for g in modules.param_groups()],
                                    lr=0.05, momentum=0.9, weight_decay=5e-4)
        parts = dict(encoder=encoder, modules=modules, memories=memories, optimizer=optimizer,
                     ema=EMATeacher(encoder, alpha=0.9))
        return parts, CMAGStage2Loss(stage2, modules, lambda_graph=0.2), match, neighbours

    def steps(parts, criterion, match, neighbours, epochs):
        for epoch in epochs:
            parts["optimizer"].zero_grad()
            total, terms, _ = _call(criterion, epoch, parts["memories"], match, neighbours, parts["encoder"], batch)
            assert all(value == value for value in terms.values())
            total.backward()
            parts["optimizer"].step()
            parts["ema"].update(parts["encoder"])

    straight, criterion, match, neighbours = fresh()
    steps(straight, criterion, match, neighbours, range(4))

    first, criterion, match, neighbours = fresh()
    steps(first, criterion, match, neighbours, range(2))
    saved = _save(first)
    resumed, criterion, match, neighbours = fresh()
    for name, obj in resumed.items():
        obj.load_state_dict(saved[name])
    steps(resumed, criterion, match, neighbours, range(2, 4))

    expected, got = _flat_state(straight), _flat_state(resumed)
    tensors = [key for key, value in expected.items() if isinstance(value, torch.Tensor)]
    assert len(tensors) > 60 and set(expected) == set(got)
    for key in tensors:
        assert torch.equal(expected[key], got[key]), key
    memory = resumed["modules"].circular_memory or resumed["modules"].graph_memory
    assert memory.fill_level() == 1.0 and resumed["modules"].cma.gate_value() != 0.1
    assert not torch.equal(resumed["ema"].module.shared.weight, resumed["encoder"].shared.weight)
    # the optimizer's momentum buffers are part of the resumed state too
    assert torch.equal(straight["optimizer"].state_dict()["state"][0]["momentum_buffer"],
                       resumed["optimizer"].state_dict()["state"][0]["momentum_buffer"])
