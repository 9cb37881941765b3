"""Optimiser groups and the epoch learning-rate schedule (spec training_recipe.md 3.5)."""
import math

import pytest
import torch
import torch.nn as nn

from utils.config import ConfigError, get_default_config
from utils.solver import EpochLRScheduler, build_optimizer, build_scheduler


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.head = nn.ModuleDict({"bnneck": nn.BatchNorm1d(4), "classifier": nn.Linear(4, 3, bias=False)})
        self.headless = nn.Linear(4, 4)  # "head" prefix without the dot: not a head parameter


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


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


def test_sgd_settings():
    optimizer = build_optimizer(get_default_config(), ToyModel())
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        assert group["nesterov"] is True
        assert group["weight_decay"] == 5e-4


def test_wrapped_model_keeps_the_head_group():
    model = ToyModel()
    wrapped = nn.DataParallel(model)
    groups = _groups(build_optimizer(get_default_config(), wrapped))
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


def test_no_trainable_parameters_is_an_error():
    model = ToyModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(get_default_config(), model)


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
    assert fresh.last_epoch == 25
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_unknown_scheduler_is_a_config_error():
    cfg = get_default_config()
    cfg.SOLVER.SCHEDULER = "linear"
    with pytest.raises(ConfigError, match="SOLVER.SCHEDULER"):
        build_scheduler(cfg, build_optimizer(cfg, ToyModel()))


def test_no_warmup():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = EpochLRScheduler(optimizer, base_lr=1.0, warmup_epochs=0, steps=[2])
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == 1.0
    scheduler.step(2)
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1)
