"""engine/solver.py: optimizers built from the model's parameter groups, and the learning-rate
schedules (step, cosine, constant; linear warm-up; per epoch or per iteration).

The released CMFN recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4), BASE_LR 0.1 for
the head (BNNeck and classifier) and 0.1 x that for everything else, a linear warm-up over
the first 10 epochs, then x0.1 at epochs 20 and 80, set once at the start of each of the
151 epochs.
"""
import math

import pytest
import torch
import torch.nn as nn

from engine.solver import OPTIMIZERS, SCHEDULES, LRScheduler, build_optimizer, build_scheduler
from model.base import ReIDModel
from utils.config import ConfigError, get_default_config, merge_from_list


class ToyModel(ReIDModel):
    """The default parameter groups of the model contract: ``head.*`` and the rest."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.head = nn.ModuleDict({"bnneck": nn.BatchNorm1d(4), "classifier": nn.Linear(4, 3, bias=False)})
        self.headless = nn.Linear(4, 4)  # "head" prefix without the dot: not a head parameter


class GroupsModel(ReIDModel):
    """A model declaring its own groups: lr factors, its own weight decay, a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(2))
        self.b = nn.Parameter(torch.ones(3))
        self.c = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def param_groups(self, cfg):
        return [{"name": "full", "params": [self.a], "lr_factor": 1.0},
                {"name": "fast", "params": [self.b, self.frozen], "lr_factor": 10.0, "weight_decay": 0.0},
                {"name": "only_frozen", "params": [self.frozen], "lr_factor": 3.0},
                {"name": "slow", "params": [self.c], "lr_factor": 0.25}]


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def _cfg(*opts):
    """The defaults with command-line style overrides (values given as Python objects)."""
    return merge_from_list(get_default_config(), [str(x) for x in opts])


def test_two_groups_by_head_prefix():
    model = ToyModel()
    groups = _groups(build_optimizer(get_default_config(), model))
    assert set(groups) == {"head", "backbone"}
    head_ids = {id(p) for p in model.head.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert {id(p) for p in groups["backbone"]["params"]} == trainable - head_ids
    assert all(id(p) not in trainable for p in model.frozen.parameters())
    assert groups["head"]["lr_factor"] == 1.0 and groups["backbone"]["lr_factor"] == 0.1
    assert groups["head"]["lr"] == 0.1 and groups["backbone"]["lr"] == 0.1 * 0.1


def test_sgd_settings():
    optimizer = build_optimizer(get_default_config(), ToyModel())
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        assert group["nesterov"] is True
        assert group["weight_decay"] == 5e-4


def test_one_group_per_declared_group():
    """Each group of param_groups with a trainable parameter, in order, lr BASE_LR * lr_factor;
    frozen parameters left out; a group's own weight decay kept."""
    model = GroupsModel()
    cfg = _cfg("SOLVER.BASE_LR", 0.02, "SOLVER.WEIGHT_DECAY", 1e-3)
    for name in ("sgd", "adam", "adamw"):
        cfg.SOLVER.OPTIMIZER = name
        optimizer = build_optimizer(cfg, model)
        assert [g["name"] for g in optimizer.param_groups] == ["full", "fast", "slow"]
        groups = _groups(optimizer)
        assert [[id(p) for p in groups[n]["params"]] for n in ("full", "fast", "slow")] == \
            [[id(model.a)], [id(model.b)], [id(model.c)]]
        assert [groups[n]["lr"] for n in ("full", "fast", "slow")] == [0.02 * 1.0, 0.02 * 10.0, 0.02 * 0.25]
        assert [groups[n]["weight_decay"] for n in ("full", "fast", "slow")] == [1e-3, 0.0, 1e-3]


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_optimizer_hyper_parameters(name, cls):
    cfg = _cfg("SOLVER.OPTIMIZER", name, "SOLVER.MOMENTUM", 0.8, "SOLVER.NESTEROV", False,
               "SOLVER.BETAS", [0.7, 0.95], "SOLVER.EPS", 1e-6, "SOLVER.WEIGHT_DECAY", 2e-3)
    optimizer = build_optimizer(cfg, ToyModel())
    assert type(optimizer) is cls
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 2e-3
        if name == "sgd":
            assert group["momentum"] == 0.8 and group["nesterov"] is False
        else:
            assert tuple(group["betas"]) == (0.7, 0.95) and group["eps"] == 1e-6


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_steps_match_torch_default_loop(name):
    """SOLVER.FUSED (default on): torch's fused kernel, whose steps equal those of torch's
    per-tensor loop to float rounding; off: torch's default."""
    def run(fused):
        torch.manual_seed(0)
        model = ToyModel()
        cfg = _cfg("SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", 0.05, "SOLVER.FUSED", fused)
        optimizer = build_optimizer(cfg, model)
        if not fused:
            # torch's CPU default: the plain loop over the tensors
            assert all(not g["fused"] and not g["foreach"] for g in optimizer.param_groups)
            for g in optimizer.param_groups:
                g["foreach"] = False
        else:
            assert all(g["fused"] for g in optimizer.param_groups)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    fused, loop = run(True), run(False)
    assert get_default_config().SOLVER.FUSED is True
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in fused)


def _one_step(name, **solver):
    """The value of a parameter p = 1 with zero gradient after one step at lr 0.1, weight decay 0.5."""
    model = GroupsModel()
    cfg = _cfg("SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", 0.1, "SOLVER.WEIGHT_DECAY", 0.5,
               *[x for kv in solver.items() for x in kv])
    optimizer = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model.a[0].item()


def test_weight_decay_is_coupled_for_sgd_and_adam_and_decoupled_for_adamw():
    # SGD, coupled: g = 0.5 * p = 0.5, first momentum buffer = g, Nesterov d = g + 0.9 g = 0.95
    assert _one_step("sgd") == pytest.approx(1 - 0.1 * 0.95, rel=1e-6)
    assert _one_step("sgd", **{"SOLVER.NESTEROV": False}) == pytest.approx(1 - 0.1 * 0.5, rel=1e-6)
    # Adam, coupled L2: g = 0.5; the bias-corrected first step is lr * g / (|g| + eps) = 0.1
    assert _one_step("adam") == pytest.approx(1 - 0.1, rel=1e-6)
    # AdamW, decoupled: p * (1 - lr * wd) = 0.95, and no Adam update from a zero gradient
    assert _one_step("adamw") == pytest.approx(1 - 0.1 * 0.5, rel=1e-6)


def test_wrapped_model_keeps_the_head_group():
    model = ToyModel()
    wrapped = nn.DataParallel(model)
    groups = _groups(build_optimizer(get_default_config(), wrapped))
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


def test_no_trainable_parameters_is_an_error():
    model = ToyModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(get_default_config(), model)


def test_bad_optimizer_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"SOLVER\.OPTIMIZER 'rmsprop'.*known: adam, adamw, sgd"):
        build_optimizer(_cfg("SOLVER.OPTIMIZER", "rmsprop"), ToyModel())
    with pytest.raises(ConfigError, match="SOLVER.BETAS"):
        build_optimizer(_cfg("SOLVER.OPTIMIZER", "adam", "SOLVER.BETAS", [0.9, 0.99, 0.9]), ToyModel())
    assert OPTIMIZERS.names() == ["adam", "adamw", "sgd"]
    assert SCHEDULES.names() == ["constant", "cosine", "step", "warmup_cosine"]


def test_released_step_schedule():
    cfg = get_default_config()
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer)
    backbone = {0: 0.001, 9: 0.01, 10: 0.01, 19: 0.01, 20: 0.001, 79: 0.001, 80: 0.0001, 150: 0.0001}
    for epoch, lr in backbone.items():
        scheduler.step(epoch)
        groups = _groups(optimizer)
        assert math.isclose(groups["backbone"]["lr"], lr, rel_tol=1e-9), epoch
        assert math.isclose(groups["head"]["lr"], 10 * lr, rel_tol=1e-9), epoch
        assert math.isclose(scheduler.lr_at(epoch), 10 * lr, rel_tol=1e-9), epoch
    assert math.isclose(scheduler.lr_at(4), 0.1 * 5 / 10, rel_tol=1e-9)


def test_released_epoch_schedule_is_bit_identical_to_the_formula():
    """lr = BASE_LR * factor * multiplier(e), multiplier (e + 1) / W in the warm-up, then
    GAMMA ** (number of STEPS milestones <= e), for every epoch of the run and both groups;
    the iteration passed to step() does not matter per epoch."""
    cfg = get_default_config()
    solver = cfg.SOLVER
    assert (solver.SCHEDULER, solver.SCHEDULE_UNIT, solver.BASE_LR, solver.WARMUP_EPOCHS, solver.STEPS,
            solver.GAMMA, solver.MAX_EPOCHS, solver.BACKBONE_LR_FACTOR) == \
        ("step", "epoch", 0.1, 10, [20, 80], 0.1, 151, 0.1)
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=7)
    for epoch in range(solver.MAX_EPOCHS):
        if epoch < solver.WARMUP_EPOCHS:
            multiplier = (epoch + 1) / solver.WARMUP_EPOCHS
        else:
            multiplier = solver.GAMMA ** sum(m <= epoch for m in solver.STEPS)
        scheduler.step(epoch, iteration=epoch % 7)
        groups = _groups(optimizer)
        assert groups["head"]["lr"] == solver.BASE_LR * 1.0 * multiplier, epoch
        assert groups["backbone"]["lr"] == solver.BASE_LR * 0.1 * multiplier, epoch
        assert scheduler.lr_at(epoch) == solver.BASE_LR * multiplier, epoch
        assert scheduler.last == (epoch, 0)


def test_per_iteration_schedule():
    """t = e + i / iters: warm-up (t + 1 / iters) / W, then the step rule at the fractional t."""
    cfg = _cfg("SOLVER.SCHEDULE_UNIT", "iteration")
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=4)
    # (epoch, iteration) -> multiplier, W = 10, STEPS [20, 80], 4 iterations per epoch
    expected = {
        (0, 0): 0.25 / 10,             # the first step already has 1/4 epoch of warm-up
        (0, 3): (0.75 + 0.25) / 10,
        (4, 2): (4.5 + 0.25) / 10,
        (9, 2): (9.5 + 0.25) / 10,
        (9, 3): 1.0,                   # t + 1/4 = W: the warm-up is complete
        (10, 0): 1.0,
        (19, 3): 1.0,                  # t = 19.75 is before the milestone 20
        (20, 0): 0.1,
        (79, 3): 0.1,
        (80, 1): 0.01,
    }
    for (epoch, iteration), multiplier in expected.items():
        scheduler.step(epoch, iteration)
        groups = _groups(optimizer)
        assert math.isclose(groups["head"]["lr"], 0.1 * multiplier, rel_tol=1e-12), (epoch, iteration)
        assert math.isclose(groups["backbone"]["lr"], 0.01 * multiplier, rel_tol=1e-12), (epoch, iteration)
        assert math.isclose(scheduler.lr_at(epoch, iteration), 0.1 * multiplier, rel_tol=1e-12)
        assert scheduler.last == (epoch, iteration)


def test_per_iteration_schedule_follows_the_length_of_each_epoch():
    """Epochs of the balanced sampler differ in length: t = e + i / (this epoch's iterations)."""
    cfg = _cfg("SOLVER.SCHEDULE_UNIT", "iteration")
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=4)
    scheduler.step(2, 1, iters_per_epoch=5)
    assert math.isclose(_groups(optimizer)["head"]["lr"], 0.1 * (2.2 + 0.2) / 10, rel_tol=1e-12)
    state = scheduler.state_dict()
    assert state["iters_per_epoch"] == 5
    again = build_scheduler(cfg, build_optimizer(cfg, ToyModel()), iters_per_epoch=4)
    again.load_state_dict(state)
    assert math.isclose(again.lr_at(2, 1), 0.1 * (2.2 + 0.2) / 10, rel_tol=1e-12)


def test_constant_schedule():
    cfg = _cfg("SOLVER.SCHEDULER", "constant", "SOLVER.WARMUP_EPOCHS", 4)
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer)
    assert [scheduler.lr_at(e) for e in range(4)] == [0.1 * (e + 1) / 4 for e in range(4)]
    for epoch in (4, 20, 80, 150):  # STEPS and GAMMA are ignored
        scheduler.step(epoch)
        assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1 * 0.1]
    # without warm-up (the IV-REID preset): BASE_LR from the first epoch, per iteration too
    cfg = _cfg("SOLVER.SCHEDULER", "constant", "SOLVER.WARMUP_EPOCHS", 0, "SOLVER.SCHEDULE_UNIT", "iteration")
    scheduler = build_scheduler(cfg, build_optimizer(cfg, ToyModel()), iters_per_epoch=3)
    assert {scheduler.lr_at(e, i) for e in (0, 1, 99) for i in range(3)} == {0.1}


def test_cosine_is_monotone_after_warmup():
    cfg = get_default_config()
    cfg.SOLVER.SCHEDULER = "cosine"
    scheduler = build_scheduler(cfg, build_optimizer(cfg, ToyModel()))
    warm = cfg.SOLVER.WARMUP_EPOCHS
    assert math.isclose(scheduler.lr_at(warm - 1), cfg.SOLVER.BASE_LR)
    assert math.isclose(scheduler.lr_at(warm), cfg.SOLVER.BASE_LR)
    lrs = [scheduler.lr_at(e) for e in range(warm, cfg.SOLVER.MAX_EPOCHS)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0 < lrs[-1] < 1e-3 * cfg.SOLVER.BASE_LR


def test_cosine_values():
    """0.5 (1 + cos(pi (t - W) / (MAX_EPOCHS - W))) after the warm-up; W = 10, MAX_EPOCHS 110."""
    cfg = _cfg("SOLVER.SCHEDULER", "cosine", "SOLVER.MAX_EPOCHS", 110)
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer)
    assert math.isclose(scheduler.lr_at(3), 0.1 * 4 / 10, rel_tol=1e-12)
    for epoch, multiplier in {10: 1.0, 35: (2 + math.sqrt(2)) / 4, 60: 0.5, 85: (2 - math.sqrt(2)) / 4}.items():
        scheduler.step(epoch)
        assert math.isclose(_groups(optimizer)["head"]["lr"], 0.1 * multiplier, rel_tol=1e-12), epoch
        assert math.isclose(_groups(optimizer)["backbone"]["lr"], 0.01 * multiplier, rel_tol=1e-12), epoch
    assert scheduler.lr_at(110) == pytest.approx(0.0, abs=1e-18)
    # per iteration: t = 60 + 2/4 = 60.5 -> 0.5 (1 + cos(pi 0.505))
    cfg.SOLVER.SCHEDULE_UNIT = "iteration"
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=4)
    assert math.isclose(scheduler.lr_at(60, 2), 0.1 * 0.5 * (1 + math.cos(math.pi * 0.505)), rel_tol=1e-12)


def test_state_dict_round_trip():
    cfg = get_default_config()
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer)
    scheduler.step(25)
    state = scheduler.state_dict()
    assert all(isinstance(v, (int, float, str, list)) for v in state.values())
    fresh_optimizer = build_optimizer(cfg, ToyModel())
    fresh = build_scheduler(cfg, fresh_optimizer)
    fresh.load_state_dict(state)
    assert fresh.last == (25, 0)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [0.1 * 0.1, 0.1 * 0.1 * 0.1]


def test_state_dict_round_trip_per_iteration():
    """The settings travel with the state: a scheduler built from other settings takes them."""
    cfg = _cfg("SOLVER.SCHEDULE_UNIT", "iteration", "SOLVER.SCHEDULER", "cosine")
    optimizer = build_optimizer(cfg, ToyModel())
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=5)
    scheduler.step(12, 3)
    fresh_optimizer = build_optimizer(get_default_config(), ToyModel())
    fresh = build_scheduler(get_default_config(), fresh_optimizer)
    fresh.load_state_dict(scheduler.state_dict())
    assert (fresh.unit, fresh.kind, fresh.iters_per_epoch, fresh.last) == ("iteration", "cosine", 5, (12, 3))
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert fresh.lr_at(12, 4) == scheduler.lr_at(12, 4) != scheduler.lr_at(12, 3)


def test_old_format_state_dict_loads():
    """A scheduler state written before the schedule unit existed (per-epoch, no iteration)."""
    old = {"base_lr": 0.1, "kind": "step", "warmup_epochs": 10, "steps": [20, 80], "gamma": 0.1,
           "max_epochs": 151, "last_epoch": 25}
    optimizer = build_optimizer(get_default_config(), ToyModel())
    scheduler = build_scheduler(get_default_config(), optimizer)
    scheduler.load_state_dict(old)
    assert (scheduler.unit, scheduler.last) == ("epoch", (25, 0))
    assert [g["lr"] for g in optimizer.param_groups] == [0.1 * 0.1, 0.1 * 0.1 * 0.1]
    assert scheduler.state_dict()["last_epoch"] == 25
    # before the first epoch: nothing to restore, the lrs are left as built
    optimizer = build_optimizer(get_default_config(), ToyModel())
    scheduler = build_scheduler(get_default_config(), optimizer)
    scheduler.load_state_dict(dict(old, last_epoch=-1))
    assert scheduler.last == (-1, 0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1 * 0.1]


def test_unknown_scheduler_is_a_config_error():
    cfg = get_default_config()
    cfg.SOLVER.SCHEDULER = "linear"
    with pytest.raises(ConfigError, match=r"SOLVER\.SCHEDULER 'linear'.*known: constant, cosine, step"):
        build_scheduler(cfg, build_optimizer(cfg, ToyModel()))
    cfg.SOLVER.SCHEDULER = "step"
    cfg.SOLVER.SCHEDULE_UNIT = "batch"
    with pytest.raises(ConfigError, match="SOLVER.SCHEDULE_UNIT"):
        build_scheduler(cfg, build_optimizer(cfg, ToyModel()))
    cfg.SOLVER.SCHEDULE_UNIT = "epoch"
    cfg.SOLVER.STEPS = [80, 20]
    with pytest.raises(ConfigError, match="SOLVER.STEPS must be increasing"):
        build_scheduler(cfg, build_optimizer(cfg, ToyModel()))


def test_no_warmup():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LRScheduler(optimizer, base_lr=1.0, warmup_epochs=0, steps=[2])
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == 1.0
    scheduler.step(2)
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1)
