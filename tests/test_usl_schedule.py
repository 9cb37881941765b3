"""The per-epoch cosine schedule of the unsupervised stages against torch's CosineAnnealingLR
(the released scheduler), bit for bit, for every stage's (lr, T_max, eta_min)."""
import math

import pytest
import torch

from engine.usl_schedule import CosineAnnealing, closed_form_cosine_lr, cosine_annealing_lr
from utils.errors import ConfigError

# (lr, T_max, eta_min, epochs run): SYSU stage 1, SYSU stage 2, camera-local (IR / RGB), RegDB stages
STAGES = [(3.5e-4, 50, 1e-6, 50), (3.5e-5, 50, 1e-7, 50), (3.5e-4, 50, 1e-6, 25), (3.5e-4, 50, 1e-6, 20),
          (3.5e-5, 35, 1e-7, 35), (0.5, 4, 0.01, 19)]


def _torch_lrs(lr, t_max, eta_min, epochs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("lr, t_max, eta_min, epochs", STAGES)
def test_matches_torch_cosine_annealing_bitwise(lr, t_max, eta_min, epochs):
    expected = _torch_lrs(lr, t_max, eta_min, epochs)
    assert [cosine_annealing_lr(lr, e, t_max, eta_min) for e in range(epochs)] == expected
    for e, value in enumerate(expected):
        assert closed_form_cosine_lr(lr, e, t_max, eta_min) == pytest.approx(value, rel=1e-12, abs=1e-18)


def test_closed_form_values():
    assert closed_form_cosine_lr(1.0, 0, 10, 0.1) == 1.0
    assert closed_form_cosine_lr(1.0, 10, 10, 0.1) == pytest.approx(0.1)
    assert closed_form_cosine_lr(1.0, 5, 10, 0.0) == pytest.approx(0.5)
    assert closed_form_cosine_lr(2.0, 1, 3, 0.5) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 3)) / 2)


def test_scheduler_sets_every_group_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
    schedule = CosineAnnealing(optimizer, 3.5e-4, 50, 1e-6)
    schedule.step(7)
    assert [g["lr"] for g in optimizer.param_groups] == [_torch_lrs(3.5e-4, 50, 1e-6, 8)[7]] * 3
    other = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
    restored = CosineAnnealing(other, 1.0, 1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.last_epoch == 7
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ConfigError, match="T_max"):
        CosineAnnealing(optimizer, 1.0, 0)
