"""Optimizers and learning-rate schedules.

``build_optimizer(cfg, model)``: one parameter group per entry of ``model.param_groups(cfg)``
(each with a ``name`` and an ``lr_factor``; lr = ``SOLVER.BASE_LR * lr_factor``; weight decay
``SOLVER.WEIGHT_DECAY`` unless the group sets its own), for the optimizer registered as
``SOLVER.OPTIMIZER``:

* ``sgd``: momentum ``SOLVER.MOMENTUM``, Nesterov ``SOLVER.NESTEROV``, coupled weight decay
  (released CMFN);
* ``adam``: betas ``SOLVER.BETAS``, eps ``SOLVER.EPS``, coupled L2 weight decay (released
  IV-REID);
* ``adamw``: the same with decoupled weight decay.

``build_scheduler(cfg, optimizer, iters_per_epoch)`` -> :class:`LRScheduler`, which sets every
group's lr to ``BASE_LR * lr_factor * multiplier(t)``. With ``SOLVER.SCHEDULE_UNIT epoch`` (the
released CMFN) ``t`` is the epoch e and the lr is set once, at the start of the epoch; with
``iteration`` it is set before every step at ``t = e + i / iters_per_epoch``. Multipliers
(``SCHEDULES``), after a linear warm-up of ``W = SOLVER.WARMUP_EPOCHS`` epochs in which the
multiplier is ``(e + 1) / W`` (per iteration ``(t + 1 / iters_per_epoch) / W``):

* ``step``: ``GAMMA ** (number of SOLVER.STEPS milestones <= t)``;
* ``cosine``: ``0.5 * (1 + cos(pi * (t - W) / (MAX_EPOCHS - W)))``;
* ``constant``: 1.
"""
import bisect
import math

import torch

from engine.distributed import unwrap_model
from utils.errors import ConfigError
from utils.registry import Registry

OPTIMIZERS = Registry("optimizer", "SOLVER.OPTIMIZER")
SCHEDULES = Registry("learning-rate schedule", "SOLVER.SCHEDULER")


@OPTIMIZERS.register("sgd")
def _sgd(groups, solver):
    return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, weight_decay=solver.WEIGHT_DECAY,
                           nesterov=solver.NESTEROV)


@OPTIMIZERS.register("adam")
def _adam(groups, solver):
    return torch.optim.Adam(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS), eps=solver.EPS,
                            weight_decay=solver.WEIGHT_DECAY)


@OPTIMIZERS.register("adamw")
def _adamw(groups, solver):
    return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS), eps=solver.EPS,
                             weight_decay=solver.WEIGHT_DECAY)


def build_optimizer(cfg, model):
    solver = cfg.SOLVER
    if len(solver.BETAS) != 2:
        raise ConfigError("SOLVER.BETAS must hold two numbers, got %r" % (list(solver.BETAS),))
    make = OPTIMIZERS.get(solver.OPTIMIZER)
    groups = []
    for group in unwrap_model(model).param_groups(cfg):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            groups.append(dict(group, params=params, lr=solver.BASE_LR * group["lr_factor"]))
    if not groups:
        raise ConfigError("build_optimizer: the %s model has no trainable parameters" % cfg.MODEL.NAME)
    return make(groups, solver)


@SCHEDULES.register("step")
def _step(t, steps, gamma, warmup, max_epochs):
    return gamma ** bisect.bisect_right(steps, t)


@SCHEDULES.register("cosine")
def _cosine(t, steps, gamma, warmup, max_epochs):
    return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(max_epochs - warmup, 1)))


@SCHEDULES.register("constant")
def _constant(t, steps, gamma, warmup, max_epochs):
    return 1.0


class LRScheduler:
    """Sets each group's lr = base_lr * group["lr_factor"] * multiplier(t); module docstring."""

    def __init__(self, optimizer, base_lr, kind="step", warmup_epochs=10, steps=(20, 80), gamma=0.1, max_epochs=151,
                 unit="epoch", iters_per_epoch=1):
        if warmup_epochs < 0:
            raise ConfigError("SOLVER.WARMUP_EPOCHS must be >= 0, got %r" % (warmup_epochs,))
        if list(steps) != sorted(steps):
            raise ConfigError("SOLVER.STEPS must be increasing, got %r" % (list(steps),))
        if unit not in ("epoch", "iteration"):
            raise ConfigError("SOLVER.SCHEDULE_UNIT must be 'epoch' or 'iteration', got %r" % (unit,))
        self.rule = SCHEDULES.get(kind)
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.kind = kind
        self.warmup_epochs = int(warmup_epochs)
        self.steps = [int(s) for s in steps]
        self.gamma = float(gamma)
        self.max_epochs = int(max_epochs)
        self.unit = unit
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        self.last = (-1, 0)

    def multiplier(self, epoch, iteration=0):
        if self.unit == "epoch":
            t, first = epoch, 1.0
        else:
            t, first = epoch + iteration / self.iters_per_epoch, 1.0 / self.iters_per_epoch
        if t < self.warmup_epochs:
            return (t + first) / self.warmup_epochs
        return self.rule(t, self.steps, self.gamma, self.warmup_epochs, self.max_epochs)

    def lr_at(self, epoch, iteration=0):
        """The lr of a full-rate (lr factor 1) group at (epoch, iteration)."""
        return self.base_lr * self.multiplier(epoch, iteration)

    def step(self, epoch, iteration=0, iters_per_epoch=None):
        """Set the lrs of (epoch, iteration); `iters_per_epoch` is this epoch's length when it
        varies from epoch to epoch (the balanced and PK samplers end an epoch when the ids run out)."""
        if iters_per_epoch:
            self.iters_per_epoch = int(iters_per_epoch)
        multiplier = self.multiplier(epoch, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_factor", 1.0) * multiplier
        self.last = (epoch, iteration if self.unit == "iteration" else 0)

    def state_dict(self):
        return {"base_lr": self.base_lr, "kind": self.kind, "warmup_epochs": self.warmup_epochs,
                "steps": list(self.steps), "gamma": self.gamma, "max_epochs": self.max_epochs, "unit": self.unit,
                "iters_per_epoch": self.iters_per_epoch, "last_epoch": self.last[0], "last_iteration": self.last[1]}

    def load_state_dict(self, state):
        """Restore the settings and the last position, and set that position's lrs again."""
        self.base_lr = float(state["base_lr"])
        self.kind = state["kind"]
        self.rule = SCHEDULES.get(self.kind)
        self.warmup_epochs = int(state["warmup_epochs"])
        self.steps = [int(s) for s in state["steps"]]
        self.gamma = float(state["gamma"])
        self.max_epochs = int(state["max_epochs"])
        self.unit = state.get("unit", "epoch")
        self.iters_per_epoch = int(state.get("iters_per_epoch", 1))
        epoch, iteration = int(state["last_epoch"]), int(state.get("last_iteration", 0))
        self.last = (-1, 0)
        if epoch >= 0:
            self.step(epoch, iteration)


def build_scheduler(cfg, optimizer, iters_per_epoch=1):
    solver = cfg.SOLVER
    return LRScheduler(optimizer, base_lr=solver.BASE_LR, kind=solver.SCHEDULER, warmup_epochs=solver.WARMUP_EPOCHS,
                       steps=solver.STEPS, gamma=solver.GAMMA, max_epochs=solver.MAX_EPOCHS,
                       unit=solver.SCHEDULE_UNIT, iters_per_epoch=iters_per_epoch)
