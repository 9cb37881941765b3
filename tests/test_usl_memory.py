"""The cluster memory and the token-diversity loss against the released code
(tests/golden/cmag/cluster_memory.pt, instance_memory.pt, token_diversity.pt) and against
straightforward loop references: the momentum update done in backward, the later-call-first
order of a memory used twice, use_hard, the pair-weighted neighbour loss, checkpointing."""
import os

import pytest
import torch
import torch.nn.functional as F

from loss.cluster_memory import ClusterMemory
from loss.token_diversity import token_diversity_loss

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
RTOL, ATOL = 1e-5, 1e-6
DTYPES = (torch.float32, torch.float64)


def _load(name):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.load(os.path.join(GOLDEN, name), weights_only=True)


def _close(actual, expected):
    return torch.allclose(actual.float(), expected.float(), rtol=RTOL, atol=ATOL)


def _loop_update(bank, x, targets, momentum):
    """The released update, written sample by sample (float32 momentum as released)."""
    m = torch.tensor([momentum], dtype=torch.float32)
    bank = bank.clone()
    for row, t in zip(F.normalize(x, dim=1), targets.tolist()):
        bank[t] = m.to(bank.dtype) * bank[t] + (1.0 - m).to(bank.dtype) * row
        bank[t] /= bank[t].norm()
    return bank


def _loop_hard_update(bank, x, targets, momentum):
    """use_hard: per label (first occurrence order) the least similar sample updates once."""
    m = torch.tensor([momentum], dtype=torch.float32)
    x = F.normalize(x, dim=1)
    out = bank.clone()
    for t in dict.fromkeys(targets.tolist()):
        members = [b for b, y in enumerate(targets.tolist()) if y == t]
        similarity = [float(x[b] @ bank[t]) for b in members]
        chosen = members[similarity.index(min(similarity))]
        out[t] = m.to(bank.dtype) * out[t] + (1.0 - m).to(bank.dtype) * x[chosen]
        out[t] /= out[t].norm()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(4))
def test_cluster_mode_matches_golden(index, dtype):
    case = _load("cluster_memory.pt")["cases"][index]
    memory = ClusterMemory.from_bank(case["inputs"]["bank_before"].to(dtype), temp=case["temp"],
                                     momentum=case["momentum"], use_hard=case["use_hard"])
    calls = case["inputs"]["calls"]
    inputs = [call["inputs"].to(dtype).clone().requires_grad_() for call in calls]
    losses = [memory(x, call["targets"]) for x, call in zip(inputs, calls)]
    sum(losses).backward()
    out = case["outputs"]
    for loss, expected in zip(losses, out["losses"]):
        assert loss.dtype == dtype and _close(loss.detach(), expected)
    for x, expected in zip(inputs, out["input_grads"]):
        assert _close(x.grad, expected)
    assert _close(memory.features, out["bank_after_backward"])
    assert memory.features.dtype == dtype


def test_two_calls_replay_later_call_first():
    """Independent replay: both logits use the initial bank; the later call's backward uses
    it too and updates it, then the earlier call's backward uses the updated bank."""
    case = _load("cluster_memory.pt")["cases"][2]
    bank0, (first, second) = case["inputs"]["bank_before"], case["inputs"]["calls"]
    m, temp = case["momentum"], case["temp"]

    def input_grad(forward_bank, backward_bank, call):
        x = call["inputs"].clone().requires_grad_()
        normalized = F.normalize(x, dim=1)
        probs = torch.softmax(normalized.detach() @ forward_bank.t() / temp, dim=1)
        grad_logits = (probs - F.one_hot(call["targets"], len(forward_bank))) / (len(x) * temp)
        return torch.autograd.grad(normalized, x, grad_logits @ backward_bank)[0]

    grad_second = input_grad(bank0, bank0, second)
    bank1 = _loop_update(bank0, second["inputs"], second["targets"], m)
    grad_first = input_grad(bank0, bank1, first)
    bank2 = _loop_update(bank1, first["inputs"], first["targets"], m)

    memory = ClusterMemory.from_bank(bank0, temp=temp, momentum=m)
    xs = [call["inputs"].clone().requires_grad_() for call in (first, second)]
    (memory(xs[0], first["targets"]) + memory(xs[1], second["targets"])).backward()
    assert _close(xs[0].grad, grad_first) and _close(xs[1].grad, grad_second)
    assert torch.equal(memory.features, bank2)
    # in call order the first gradient would use the initial bank: the order is what is tested
    assert not torch.allclose(input_grad(bank0, bank0, first), grad_first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_hard", (False, True))
def test_update_matches_loop_reference(use_hard, dtype):
    gen = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(7, 16, generator=gen, dtype=dtype), dim=1)
    x = torch.randn(40, 16, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 7, (40,), generator=gen)
    memory = ClusterMemory.from_bank(bank, momentum=0.2, use_hard=use_hard)
    memory(x, targets).backward()
    expected = (_loop_hard_update if use_hard else _loop_update)(bank, x.detach(), targets, 0.2)
    assert torch.equal(memory.features, expected)
    assert torch.allclose(memory.features.norm(dim=1), torch.ones(7, dtype=dtype))
    untouched = sorted(set(range(7)) - set(targets.tolist()))
    assert torch.equal(memory.features[untouched], bank[untouched])


def test_no_backward_no_update_and_bank_is_not_a_parameter():
    bank = F.normalize(torch.randn(4, 8), dim=1)
    memory = ClusterMemory.from_bank(bank)
    assert list(memory.parameters()) == [] and "features" in memory.state_dict()
    loss = memory(torch.randn(5, 8, requires_grad=True), torch.tensor([0, 1, 2, 3, 0]))
    assert torch.equal(memory.features, bank)
    loss.backward()
    assert not torch.equal(memory.features, bank)


def test_checkpoint_restores_bitwise_and_continues_identically():
    gen = torch.Generator().manual_seed(5)
    memory = ClusterMemory.from_bank(F.normalize(torch.randn(6, 12, generator=gen), dim=1), momentum=0.8)
    batches = [(torch.randn(10, 12, generator=gen), torch.randint(0, 6, (10,), generator=gen)) for _ in range(3)]

    def train(mem, steps):
        for x, y in steps:
            mem(x.clone().requires_grad_(), y).backward()

    train(memory, batches[:1])
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    restored = ClusterMemory.from_bank(state["features"], momentum=0.8)
    reloaded = ClusterMemory(12, 6, momentum=0.8)
    reloaded.load_state_dict(state)
    for mem in (memory, restored, reloaded):
        train(mem, batches[1:])
    assert torch.equal(memory.features, restored.features) and torch.equal(memory.features, reloaded.features)


def test_gather_updates_with_every_process_batch():
    """A fake two-process gather: the bank follows the concatenated batch, the gradient the local one."""
    gen = torch.Generator().manual_seed(6)
    bank = F.normalize(torch.randn(5, 8, generator=gen), dim=1)
    local, other = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    y_local, y_other = torch.randint(0, 5, (6,), generator=gen), torch.randint(0, 5, (6,), generator=gen)
    remote = {torch.int64: y_other, torch.float32: F.normalize(other, dim=1)}
    memory = ClusterMemory.from_bank(bank, gather=lambda t: torch.cat([t, remote[t.dtype]]))
    x = local.clone().requires_grad_()
    memory(x, y_local).backward()
    single = ClusterMemory.from_bank(bank)
    x_single = local.clone().requires_grad_()
    single(x_single, y_local).backward()
    assert torch.equal(x.grad, x_single.grad)
    expected = _loop_update(bank, torch.cat([local, other]), torch.cat([y_local, y_other]), 0.2)
    assert torch.equal(memory.features, expected)


def test_autocast_runs_in_float32():
    gen = torch.Generator().manual_seed(7)
    bank = F.normalize(torch.randn(4, 8, generator=gen), dim=1)
    x, y = torch.randn(6, 8, generator=gen), torch.tensor([0, 1, 2, 3, 1, 0])
    plain = ClusterMemory.from_bank(bank)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ClusterMemory.from_bank(bank)(x.bfloat16(), y)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, plain, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neighbour_mode_matches_golden(dtype):
    data = _load("instance_memory.pt")
    inputs, out = data["inputs"], data["outputs"]
    memory = ClusterMemory.from_bank(inputs["instance_bank"].to(dtype), temp=data["temp"])
    x = inputs["x"].to(dtype).clone().requires_grad_()
    loss = memory.neighbour_loss(x, inputs["targets"])
    loss.backward()
    assert _close(loss.detach(), out["loss"]) and _close(x.grad, out["x_grad"])
    assert out["bank_unchanged"] and torch.equal(memory.features, inputs["instance_bank"].to(dtype))
    empty = memory.neighbour_loss(x, [[] for _ in range(len(x))])
    assert type(empty) is float and empty == 0.0 and out["all_targets_empty_type"] == "float"


def test_neighbour_mode_matches_pair_loop():
    gen = torch.Generator().manual_seed(8)
    bank = F.normalize(torch.randn(30, 16, generator=gen), dim=1)
    x = torch.randn(7, 16, generator=gen, requires_grad=True)
    targets = [[0, 5, 29], [], [3], [3, 3], [], [10, 11, 12, 13, 14], [7]]
    loss = ClusterMemory.from_bank(bank, temp=0.05).neighbour_loss(x, targets)
    loss.backward()
    grad = x.grad.clone()
    x.grad = None
    logits = F.normalize(x, dim=1) @ bank.t() / 0.05
    pairs = [F.cross_entropy(logits[b:b + 1], torch.tensor([j])) for b, row in enumerate(targets) for j in row]
    expected = sum(pairs) / len(pairs)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=RTOL, atol=ATOL) and torch.allclose(grad, x.grad, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="target lists"):
        ClusterMemory.from_bank(bank).neighbour_loss(x, targets[:3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(3))
def test_token_diversity_matches_golden(index, dtype):
    case = _load("token_diversity.pt")["cases"][index]
    tokens = case["inputs"]["tokens"].to(dtype).clone().requires_grad_()
    loss = token_diversity_loss(tokens, case["dynamic_balancer"])
    loss.backward()
    assert loss.dtype == dtype
    assert _close(loss.detach(), case["outputs"]["loss"]) and _close(tokens.grad, case["outputs"]["tokens_grad"])


def test_token_diversity_hand_case_and_list_input():
    # K = 3: pairs (0,1) |cos| = 1, (0,2) = 0, (1,2) = 0
    tokens = torch.tensor([[[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]]])
    weights = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    assert torch.allclose(token_diversity_loss(tokens), weights[0])
    assert torch.allclose(token_diversity_loss(tokens, dynamic_balancer=False), torch.tensor(1 / 3))
    assert torch.equal(token_diversity_loss(list(tokens.unbind(1))), token_diversity_loss(tokens))
    assert torch.isnan(token_diversity_loss(torch.zeros(1, 2, 4)))  # no epsilon, as released
    with pytest.raises(ValueError, match="K >= 2"):
        token_diversity_loss(torch.ones(2, 1, 4))
