"""Optimizers and learning-rate schedules.

``build_optimizer(cfg, model)``: one parameter group per entry of ``model.param_groups(cfg)``
(each with a ``name`` and an ``lr_factor``; lr = ``SOLVER.BASE_LR * lr_factor``; weight decay
``SOLVER.WEIGHT_DECAY`` unless the group sets its own), for the optimizer registered as
``SOLVER.OPTIMIZER``:

* ``sgd``: momentum ``SOLVER.MOMENTUM``, Nesterov ``SOLVER.NESTEROV``, coupled weight decay
  (released CMFN);
* ``adam``: betas ``SOLVER.BETAS``, eps ``SOLVER.EPS``, coupled L2 weight decay (released
  IV-REID);
* ``adamw``: the same with decoupled weight decay;

each with torch's fused implementation when ``SOLVER.FUSED`` (one kernel updates every tensor;
on the CPU the CMFN model's SGD step takes about a quarter of the time of torch's default
per-tensor loop; the results agree to float rounding).

``build_scheduler(cfg, optimizer, iters_per_epoch)`` -> :class:`LRScheduler`, which sets the lr
of every group from its full lr ``v = BASE_LR * lr_factor`` and the time ``t``. With
``SOLVER.SCHEDULE_UNIT epoch`` (the released recipes) ``t`` is the epoch e and the lr is set
once, at the start of the epoch; with ``iteration`` it is set before every step at
``t = e + i / iters_per_epoch``. Schedules (``SCHEDULES``), with ``W = SOLVER.WARMUP_EPOCHS``
and ``T = SOLVER.MAX_EPOCHS``:

* ``step``: ``v * GAMMA ** (number of SOLVER.STEPS milestones <= t)``;
* ``cosine``: ``v * 0.5 * (1 + cos(pi * (t - W) / (T - W)))``;
* ``constant``: ``v``;

each after a linear warm-up in which the lr is ``v * (e + 1) / W`` (per iteration
``v * (t + 1 / iters_per_epoch) / W``);

* ``warmup_cosine``: timm's ``CosineLRScheduler`` as FusionReID calls it, on the released
  1-based epoch ``s = t + 1`` (it steps the schedule with the epoch number 1..T at the start of
  each epoch), with absolute warm-up start ``l0 = SOLVER.WARMUP_LR_INIT`` and floor
  ``m = SOLVER.MIN_LR``, the same for every group (not scaled by the lr factor)::

      s < W:        l0 + s * ((v - l0) / W)
      W <= s < T:   m + 0.5 * (v - m) * (1 + cos(pi * s / T))     (s not shifted by the warm-up)
      s >= T:       m

  so the last epoch trains at exactly ``m`` in every group.
"""
import bisect
import math

import torch

from engine.distributed import unwrap_model
from utils.errors import ConfigError
from utils.registry import Registry

OPTIMIZERS = Registry("optimizer", "SOLVER.OPTIMIZER")
SCHEDULES = Registry("learning-rate schedule", "SOLVER.SCHEDULER")


def _fused(solver):
    # None, not False, leaves torch its default choice (foreach on CUDA)
    return True if solver.FUSED else None


@OPTIMIZERS.register("sgd")
def _sgd(groups, solver):
    return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, weight_decay=solver.WEIGHT_DECAY,
                           nesterov=solver.NESTEROV, fused=_fused(solver))


@OPTIMIZERS.register("adam")
def _adam(groups, solver):
    return torch.optim.Adam(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS), eps=solver.EPS,
                            weight_decay=solver.WEIGHT_DECAY, fused=_fused(solver))


@OPTIMIZERS.register("adamw")
def _adamw(groups, solver):
    return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS), eps=solver.EPS,
                             weight_decay=solver.WEIGHT_DECAY, fused=_fused(solver))


def bias_groups(named_parameters, cfg, lr_factor=1.0):
    """Two groups as FusionReID's optimizer makes them: the trainable tensors whose name contains
    "bias" (lr factor ``lr_factor * SOLVER.BIAS_LR_FACTOR``, weight decay
    ``SOLVER.WEIGHT_DECAY_BIAS``) and the rest (``lr_factor``, ``SOLVER.WEIGHT_DECAY``).

    The released code makes one SGD group per tensor with these values; SGD updates each tensor
    from its own group values only, so two groups give the same steps.
    """
    biases, others = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (biases if "bias" in name else others).append(param)
    return [{"name": "weights", "params": others, "lr_factor": lr_factor, "weight_decay": cfg.SOLVER.WEIGHT_DECAY},
            {"name": "biases", "params": biases, "lr_factor": lr_factor * cfg.SOLVER.BIAS_LR_FACTOR,
             "weight_decay": cfg.SOLVER.WEIGHT_DECAY_BIAS}]


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


def _linear_warmup(rule):
    """A multiplicative schedule `rule(s, t)` behind the linear warm-up of the module docstring."""
    def lr(s, v, t, first):
        if t < s.warmup_epochs:
            return v * ((t + first) / s.warmup_epochs)
        return v * rule(s, t)
    return lr


@SCHEDULES.register("step")
@_linear_warmup
def _step(s, t):
    return s.gamma ** bisect.bisect_right(s.steps, t)


@SCHEDULES.register("cosine")
@_linear_warmup
def _cosine(s, t):
    return 0.5 * (1.0 + math.cos(math.pi * (t - s.warmup_epochs) / max(s.max_epochs - s.warmup_epochs, 1)))


@SCHEDULES.register("constant")
@_linear_warmup
def _constant(s, t):
    return 1.0


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(s, v, t, first):
    released = t + 1
    if released < s.warmup_epochs:
        return s.warmup_lr_init + released * ((v - s.warmup_lr_init) / s.warmup_epochs)
    if released < s.max_epochs:
        return s.min_lr + 0.5 * (v - s.min_lr) * (1 + math.cos(math.pi * released / s.max_epochs))
    return s.min_lr


class LRScheduler:
    """Sets each group's lr from v = base_lr * group["lr_factor"] and t; module docstring."""

    def __init__(self, optimizer, base_lr, kind="step", warmup_epochs=10, steps=(20, 80), gamma=0.1, max_epochs=151,
                 unit="epoch", iters_per_epoch=1, warmup_lr_init=0.0, min_lr=0.0):
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
        self.warmup_lr_init = float(warmup_lr_init)
        self.min_lr = float(min_lr)
        self.last = (-1, 0)

    def group_lr(self, v, epoch, iteration=0):
        """The lr of a group whose full lr is `v` at (epoch, iteration)."""
        if self.unit == "epoch":
            t, first = epoch, 1.0
        else:
            t, first = epoch + iteration / self.iters_per_epoch, 1.0 / self.iters_per_epoch
        return self.rule(self, v, t, first)

    def lr_at(self, epoch, iteration=0):
        """The lr of a full-rate (lr factor 1) group at (epoch, iteration)."""
        return self.group_lr(self.base_lr, epoch, iteration)

    def step(self, epoch, iteration=0, iters_per_epoch=None):
        """Set the lrs of (epoch, iteration); `iters_per_epoch` is this epoch's length when it
        varies from epoch to epoch (the balanced and PK samplers end an epoch when the ids run out)."""
        if iters_per_epoch:
            self.iters_per_epoch = int(iters_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.group_lr(self.base_lr * group.get("lr_factor", 1.0), epoch, iteration)
        self.last = (epoch, iteration if self.unit == "iteration" else 0)

    def state_dict(self):
        return {"base_lr": self.base_lr, "kind": self.kind, "warmup_epochs": self.warmup_epochs,
                "steps": list(self.steps), "gamma": self.gamma, "max_epochs": self.max_epochs, "unit": self.unit,
                "iters_per_epoch": self.iters_per_epoch, "warmup_lr_init": self.warmup_lr_init, "min_lr": self.min_lr,
                "last_epoch": self.last[0], "last_iteration": self.last[1]}

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
        self.warmup_lr_init = float(state.get("warmup_lr_init", 0.0))
        self.min_lr = float(state.get("min_lr", 0.0))
        epoch, iteration = int(state["last_epoch"]), int(state.get("last_iteration", 0))
        self.last = (-1, 0)
        if epoch >= 0:
            self.step(epoch, iteration)


def build_scheduler(cfg, optimizer, iters_per_epoch=1):
    solver = cfg.SOLVER
    return LRScheduler(optimizer, base_lr=solver.BASE_LR, kind=solver.SCHEDULER, warmup_epochs=solver.WARMUP_EPOCHS,
                       steps=solver.STEPS, gamma=solver.GAMMA, max_epochs=solver.MAX_EPOCHS,
                       unit=solver.SCHEDULE_UNIT, iters_per_epoch=iters_per_epoch,
                       warmup_lr_init=solver.WARMUP_LR_INIT, min_lr=solver.MIN_LR)
