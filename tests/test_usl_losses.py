"""The TokenMatcher loss composition against one iteration of the released stage-2 trainer
(tests/golden/cmag/trainer_stage2_iteration.pt: SYSU epochs 0 and 1, the RegDB mirror branch
with its neighbour-index bug): loss terms, the order of every memory call, parameter
gradients, parameters after the SGD step and the banks after the momentum updates. Also the
stage-1 / camera-local totals, the weight schedule, the mate-row order quirk and its fix."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from cluster.dtnl import NeighbourSets
from cluster.matching import ClusterMatch
from loss.cluster_memory import ClusterMemory
from loss.token_diversity import token_diversity_loss
from loss.tokenmatcher import Stage2Loss, Stage2Memories, camera_local_loss, stage1_loss

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
RTOL, ATOL = 1e-5, 1e-6
# released trainer attribute -> Stage2Memories attribute
MEMORIES = {"memory_ir": "mixed_ir", "memory_rgb": "mixed_rgb", "memory_IR": "modality_ir",
            "memory_RGB": "modality_rgb", "memory_ins_ir": "instance_ir", "memory_ins_rgb": "instance_rgb"}


class StubEncoder(nn.Module):
    """The golden's stub with the encoder's call convention: a Linear + tanh stem per modality
    (visible `vis`, thermal `th`), a shared Linear, K tokens of C columns, one BatchNorm1d per
    token with a frozen bias; returns (feats, feats[:B1], feats[B1:], RGB tokens, IR tokens)."""

    def __init__(self, in_dim=24, num_tokens=4, width=8):
        super().__init__()
        dim = num_tokens * width
        self.vis, self.th, self.shared = nn.Linear(in_dim, dim), nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(num_tokens))
        for bn in self.bns:
            bn.bias.requires_grad_(False)
        self.width = width

    def forward(self, x1, x2):
        hidden = self.shared(torch.cat([torch.tanh(self.vis(x1.flatten(1))), torch.tanh(self.th(x2.flatten(1)))]))
        tokens = list(hidden.split(self.width, dim=1))
        feats = torch.cat([bn(token) for bn, token in zip(self.bns, tokens)], dim=1)
        b1 = len(x1)
        return feats, feats[:b1], feats[b1:], [t[:b1] for t in tokens], [t[b1:] for t in tokens]


@pytest.fixture(scope="module")
def golden():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.load(os.path.join(GOLDEN, "trainer_stage2_iteration.pt"), weights_only=True)


def _log_calls(memories):
    """Record (released name, rows, targets, neighbour mode, loss) of every memory call."""
    calls, released = [], {ours: theirs for theirs, ours in MEMORIES.items()}
    for name, memory in memories.named_children():
        for method, instance in (("forward", False), ("neighbour_loss", True)):
            def logged(inputs, targets, _call=getattr(memory, method), _name=name, _instance=instance):
                out = _call(inputs, targets)
                listed = targets if _instance else torch.as_tensor(targets).tolist()
                value = float(out.detach()) if torch.is_tensor(out) else out
                calls.append((released[_name], len(inputs), listed, _instance, value))
                return out
            setattr(memory, method, logged)
    return calls


def _run_case(case, lookup_by_camera=False, dtype=torch.float32, **call_kwargs):
    inputs = case["inputs"]
    model = StubEncoder(case["stub"]["in_dim"], case["stub"]["K"], case["stub"]["C"])
    model.load_state_dict(case["stub"]["state_dict_before"])
    model.to(dtype).train()
    memories = Stage2Memories.from_banks({MEMORIES[k]: v.to(dtype) for k, v in inputs["banks_before"].items()},
                                         mixed_momentum=inputs["bank_momentum"]["memory_ir"],
                                         modality_momentum=inputs["bank_momentum"]["memory_IR"])
    calls = _log_calls(memories)
    mirror = not isinstance(case["i2r"][1], list)
    match = ClusterMatch(r2i=case["r2i"], i2r=case["i2r"], mirror=mirror, counts=None, similarity=None)
    neighbours = NeighbourSets(ir=inputs["topk_ir"], rgb=inputs["topk_rgb"], i2r=inputs["topk_i2r"],
                               r2i=inputs["topk_r2i"])
    lambdas = case["lambdas"]
    loss = Stage2Loss(lambdas["neighbor"], lambdas["cross"], lambdas["mate"], lambdas["mate"],
                      lookup_by_camera=lookup_by_camera)
    x_rgb = torch.cat([inputs["rgb_images"], inputs["rgb_images_view2"]]).to(dtype)
    _, f_rgb, f_ir, tokens_rgb, tokens_ir = model(x_rgb, inputs["ir_images"].to(dtype))
    kwargs = dict(index_ir=inputs["ir_indexes"], index_rgb=inputs["rgb_indexes"] * 2)
    kwargs.update(call_kwargs)
    total, terms, info = loss(case["epoch"], memories, match, f_ir, f_rgb, inputs["ir_labels"],
                              inputs["rgb_labels"] * 2, tokens_ir, tokens_rgb, neighbours, **kwargs)
    optimizer = torch.optim.SGD([{"params": [p]} for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9, weight_decay=5e-4)
    optimizer.zero_grad()
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return dict(terms=terms, info=info, calls=calls, grads=grads, state=model.state_dict(),
                banks={theirs: getattr(memories, ours).features for theirs, ours in MEMORIES.items()})


def _close(actual, expected):
    return torch.allclose(actual.double(), expected.double(), rtol=RTOL, atol=ATOL)


def _check(result, case, float_rtol=RTOL):
    breakdown = case["loss_breakdown"]
    expected = {"cluster_ir": breakdown["loss_ir"], "cluster_rgb": breakdown["loss_rgb"],
                "diversity": breakdown["diversity"], "neighbour": sum(breakdown["neighbour_terms"]),
                "cross": sum(breakdown["cross_terms"]), "mate": breakdown["mate"], "total": breakdown["total"]}
    assert result["terms"].keys() == expected.keys()
    for name, value in expected.items():
        assert result["terms"][name] == pytest.approx(value, rel=float_rtol), name
    assert len(result["calls"]) == len(case["memory_calls"])
    for ours, theirs in zip(result["calls"], case["memory_calls"]):
        assert ours[:4] == (theirs["memory"], theirs["n_inputs"], theirs["targets"], theirs["instance_mode"])
        assert ours[4] == pytest.approx(theirs["loss"], rel=float_rtol)
    outputs = case["outputs"]
    assert result["grads"].keys() == outputs["grads"].keys()
    for name, grad in outputs["grads"].items():
        assert _close(result["grads"][name], grad), name
    for name, value in outputs["state_dict_after_step"].items():
        assert _close(result["state"][name], value), name
    for name, bank in outputs["banks_after"].items():
        assert _close(result["banks"][name], bank), name


@pytest.mark.parametrize("index", (0, 1))
def test_sysu_iteration_matches_golden(golden, index):
    case = golden["cases"][index]
    result = _run_case(case)
    _check(result, case)
    assert result["info"]["lambda_mate"] == case["lambdas"]["mate"]


def test_sysu_iteration_in_float64(golden):
    case = golden["cases"][0]
    result = _run_case(case, dtype=torch.float64)
    assert all(bank.dtype == torch.float64 for bank in result["banks"].values())
    _check(result, case)


def test_regdb_iteration_reproduces_camera_slot_lookup(golden):
    """The released RegDB rows carry camera id 0 where the image index belongs; with the true
    (distinct) indexes and lookup_by_camera every row still uses image 0's lists."""
    case = golden["cases"][2]
    assert set(case["inputs"]["ir_indexes"]) == {0}
    true_ir, true_rgb = list(range(3, 11)), [1, 2, 5, 7] * 2
    result = _run_case(case, lookup_by_camera=True, index_ir=true_ir, index_rgb=true_rgb,
                       camid_ir=case["inputs"]["ir_indexes"], camid_rgb=case["inputs"]["rgb_indexes"] * 2)
    _check(result, case)
    fixed = _run_case(case, lookup_by_camera=False, index_ir=true_ir, index_rgb=true_rgb)
    neighbour_calls = [c for c in fixed["calls"] if c[3]]
    assert neighbour_calls[0][2] == [case["inputs"]["topk_ir"][i] for i in true_ir]
    assert neighbour_calls[1][2] == [case["inputs"]["topk_rgb"][i] for i in true_rgb]
    with pytest.raises(ValueError, match="camera ids"):
        _run_case(case, lookup_by_camera=True, index_ir=true_ir, index_rgb=true_rgb)


def _memory(rows, dim, seed, momentum=0.2):
    gen = torch.Generator().manual_seed(seed)
    return ClusterMemory.from_bank(F.normalize(torch.randn(rows, dim, generator=gen), dim=1), momentum=momentum)


def test_stage1_and_camera_local_totals():
    gen = torch.Generator().manual_seed(11)
    f_ir, f_rgb = torch.randn(8, 16, generator=gen, requires_grad=True), torch.randn(8, 16, generator=gen)
    y_ir, y_rgb = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    tok_ir, tok_rgb = torch.randn(8, 4, 4, generator=gen), torch.randn(8, 4, 4, generator=gen)
    memory_ir, memory_rgb = _memory(4, 16, 1), _memory(3, 16, 2)
    banks = memory_ir.features.clone(), memory_rgb.features.clone()
    total, terms, info = stage1_loss(memory_ir, memory_rgb, f_ir, f_rgb, y_ir, y_rgb, tok_ir, tok_rgb)
    expected_ir = F.cross_entropy(F.normalize(f_ir.detach(), dim=1) @ banks[0].t() / 0.05, y_ir)
    expected_rgb = F.cross_entropy(F.normalize(f_rgb, dim=1) @ banks[1].t() / 0.05, y_rgb)
    diversity = token_diversity_loss(tok_ir) + token_diversity_loss(tok_rgb)
    assert terms["cluster_ir"] == pytest.approx(float(expected_ir), rel=RTOL)
    assert terms["cluster_rgb"] == pytest.approx(float(expected_rgb), rel=RTOL)
    assert terms["total"] == pytest.approx(float(expected_ir + expected_rgb + diversity), rel=RTOL)
    assert info == {}
    memory = _memory(4, 16, 3)
    total_cam, terms_cam, _ = camera_local_loss(memory, f_ir, y_ir, list(tok_ir.unbind(1)))
    assert terms_cam["total"] == pytest.approx(terms_cam["cluster"] + float(token_diversity_loss(tok_ir)), rel=RTOL)
    (total + total_cam).backward()
    assert not torch.equal(memory_ir.features, banks[0])


def test_mate_weight_schedule():
    loss = Stage2Loss()
    assert loss.weights(0) == {"lambda_neighbour": 0.5, "lambda_cross": 0.4, "lambda_mate": 0.03}
    assert loss.weights(35)["lambda_mate"] == 0.03 and loss.weights(36)["lambda_mate"] == 0.12
    regdb = Stage2Loss(0.1, 0.4, 0.01, 0.01)
    assert regdb.weights(34)["lambda_mate"] == 0.01


def _mate_setup(n_rows):
    """RGB clusters 0..3: IR 0 <- [0, 1], IR 1 <- [2, 3]; row 1 labelled 0 (mate target 1),
    row 40 labelled 2 (target 3), the other rows 1 (even rows) or 3 (odd rows), which even
    epochs drop."""
    match = ClusterMatch(r2i={0: 0, 1: 0, 2: 1, 3: 1}, i2r={0: [0, 1], 1: [2, 3]}, mirror=False, counts=None,
                         similarity=None)
    labels = torch.full((n_rows,), 1)
    labels[1::2] = 3
    labels[1], labels[40] = 0, 2
    gen = torch.Generator().manual_seed(4)
    memories = Stage2Memories(mixed_ir=_memory(2, 8, 5), mixed_rgb=_memory(4, 8, 6), modality_ir=_memory(2, 8, 7),
                              modality_rgb=_memory(4, 8, 8))
    return match, labels, torch.randn(n_rows, 8, generator=gen), memories


def test_mate_rows_keep_the_released_set_order_unless_fixed():
    n_rows = 64
    kept_released = list(set(range(n_rows)) - (set(range(n_rows)) - {1, 40}))  # as the released code builds it
    assert kept_released == [40, 1]  # CPython: 40 lands in slot 0 of the 8-slot result table
    match, labels, f_rgb, memories = _mate_setup(n_rows)
    f_ir, labels_ir, tokens = torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2, 4)
    results = {}
    for fix in (False, True):
        _, terms, info = Stage2Loss(0.0, 0.0, 1.0, 1.0, fix_mate_row_order=fix)(
            0, memories, match, f_ir, f_rgb, labels_ir, labels, tokens, torch.randn(n_rows, 2, 4))
        results[fix] = terms["mate"]
        assert info["mate_rows"] == 2.0
    targets = torch.tensor([1, 3])  # in row order 1, 40
    bank = memories.modality_rgb.features
    for fix, rows in ((False, kept_released), (True, [1, 40])):
        expected = F.cross_entropy(F.normalize(f_rgb[rows], dim=1) @ bank.t() / 0.05, targets)
        assert results[fix] == pytest.approx(float(expected), rel=RTOL)
    assert results[False] != pytest.approx(results[True], rel=1e-3)


def test_mate_odd_epoch_and_no_kept_rows():
    match, labels, f_rgb, memories = _mate_setup(64)
    f_ir, labels_ir = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    loss = Stage2Loss(0.0, 0.0, 1.0, 1.0)
    _, _, info = loss(1, memories, match, f_ir, f_rgb, labels_ir, labels, torch.randn(4, 2, 4), torch.randn(64, 2, 4))
    assert info["mate_rows"] == 62.0  # odd epochs keep labels 1 and 3 (the second of each pair)
    lonely = ClusterMatch(r2i={0: 0, 1: 1}, i2r={0: [0], 1: [1]}, mirror=False, counts=None, similarity=None)
    calls = _log_calls(memories)
    _, terms, info = loss(0, memories, lonely, f_ir, f_rgb[:4], labels_ir, torch.tensor([0, 1, 1, 0]),
                          torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    assert terms["mate"] == 0.0 and info["mate_rows"] == 0.0
    assert [c[0] for c in calls] == ["memory_ir", "memory_rgb"]


def test_zero_weights_skip_their_memory_calls():
    match, labels, f_rgb, memories = _mate_setup(64)
    calls = _log_calls(memories)
    banks = {k: v.clone() for k, v in memories.banks().items()}
    f_ir = torch.randn(4, 8, requires_grad=True)
    total, terms, _ = Stage2Loss(0.0, 0.0, 0.0, 0.0)(0, memories, match, f_ir, f_rgb, torch.tensor([0, 1, 0, 1]),
                                                    labels, torch.randn(4, 2, 4), torch.randn(64, 2, 4))
    assert set(terms) == {"cluster_ir", "cluster_rgb", "diversity", "total"}
    assert [c[0] for c in calls] == ["memory_ir", "memory_rgb"]
    total.backward()
    assert torch.equal(memories.modality_rgb.features, banks["modality_rgb"])
    with pytest.raises(ValueError, match="neighbour lists"):
        Stage2Loss(0.5, 0.0, 0.0, 0.0)(0, memories, match, f_ir, f_rgb, torch.tensor([0, 1, 0, 1]), labels,
                                       torch.randn(4, 2, 4), torch.randn(64, 2, 4))


def test_stage2_memories_checkpoint_roundtrip(golden):
    banks = {MEMORIES[k]: v for k, v in golden["cases"][0]["inputs"]["banks_before"].items()}
    memories = Stage2Memories.from_banks(banks, mixed_momentum=0.8, modality_momentum=0.2)
    assert memories.mixed_ir.momentum == 0.8 and memories.modality_rgb.momentum == 0.2
    state = memories.state_dict()
    assert set(state) == {name + ".features" for name in banks}
    restored = Stage2Memories.from_banks({k: v.clone() for k, v in memories.banks().items()})
    assert all(torch.equal(restored.banks()[k], banks[k]) for k in banks)
    without_instances = Stage2Memories.from_banks({k: v for k, v in banks.items() if not k.startswith("instance")})
    assert without_instances.instance_ir is None and "instance_ir" not in without_instances.banks()


def test_from_config_reads_the_usl_keys():
    cfg = CN({"DATASET": CN({"NAME": "regdb"}), "USL": CN({
        "LAMBDA_NEIGHBOUR": 0.1, "LAMBDA_CROSS": 0.4, "LAMBDA_MATE": 0.01, "LAMBDA_MATE_LATE": 0.01,
        "MATE_SWITCH_EPOCH": 35, "DIVERSITY_BALANCER": True, "FIX_REGDB_NEIGHBOUR_INDEX": False,
        "FIX_MATE_ROW_ORDER": False})})
    loss = Stage2Loss.from_config(cfg)
    assert loss.lookup_by_camera and loss.lambda_neighbour == 0.1 and loss.weights(40)["lambda_mate"] == 0.01
    cfg.USL.FIX_REGDB_NEIGHBOUR_INDEX = True
    assert not Stage2Loss.from_config(cfg).lookup_by_camera
    cfg.DATASET.NAME, cfg.USL.FIX_REGDB_NEIGHBOUR_INDEX = "sysu", False
    assert not Stage2Loss.from_config(cfg).lookup_by_camera
