"""Optimiser and epoch-wise learning-rate schedule (spec training_recipe.md 3.5).

``build_optimizer(cfg, model)``: SGD (momentum ``SOLVER.MOMENTUM``, Nesterov
``SOLVER.NESTEROV``, weight decay ``SOLVER.WEIGHT_DECAY`` on every parameter, BN and
biases included) with two parameter groups, each carrying a ``name`` and an ``lr_factor``:

* ``head``: trainable parameters whose name starts with ``head.`` (BNNeck + classifier),
  lr factor 1;
* ``backbone``: every other trainable parameter (backbone and all new modules), lr factor
  ``SOLVER.BACKBONE_LR_FACTOR`` (released 0.1).

Frozen parameters (``requires_grad`` False) are left out; a group without parameters is
omitted.

``build_scheduler(cfg, optimizer) -> EpochLRScheduler``: ``step(epoch)`` (call at the start
of each epoch) sets every group's lr to ``BASE_LR * lr_factor * multiplier(epoch)``:

* ``epoch < WARMUP_EPOCHS``: ``(epoch + 1) / WARMUP_EPOCHS`` (linear warm-up);
* ``"step"`` (released): ``GAMMA ** (number of SOLVER.STEPS milestones <= epoch)``;
* ``"cosine"``: ``0.5 * (1 + cos(pi * (epoch - W) / (MAX_EPOCHS - W)))`` after the warm-up W.
"""
import bisect
import math

import torch

from utils.config import ConfigError

SCHEDULERS = ("step", "cosine")
HEAD_PREFIX = "head."


def _unwrap(model):
    """The module whose parameter names start with ``head.`` (DDP / torch.compile wrappers removed)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def build_optimizer(cfg, model):
    solver = cfg.SOLVER
    head, backbone = [], []
    for name, param in _unwrap(model).named_parameters():
        if param.requires_grad:
            (head if name.startswith(HEAD_PREFIX) else backbone).append(param)
    if not head and not backbone:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = []
    for name, params, factor in (("head", head, 1.0), ("backbone", backbone, float(solver.BACKBONE_LR_FACTOR))):
        if params:
            groups.append({"params": params, "name": name, "lr_factor": factor, "lr": solver.BASE_LR * factor})
    return torch.optim.SGD(
        groups,
        lr=solver.BASE_LR,
        momentum=solver.MOMENTUM,
        weight_decay=solver.WEIGHT_DECAY,
        nesterov=solver.NESTEROV,
    )


class EpochLRScheduler:
    """Sets each group's lr = base_lr * group["lr_factor"] * multiplier(epoch)."""

    def __init__(self, optimizer, base_lr, kind="step", warmup_epochs=10, steps=(20, 80), gamma=0.1, max_epochs=151):
        if kind not in SCHEDULERS:
            raise ConfigError("SOLVER.SCHEDULER must be one of %s, got %r" % (", ".join(SCHEDULERS), kind))
        if warmup_epochs < 0:
            raise ConfigError("SOLVER.WARMUP_EPOCHS must be >= 0, got %r" % (warmup_epochs,))
        if list(steps) != sorted(steps):
            raise ConfigError("SOLVER.STEPS must be increasing, got %r" % (list(steps),))
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.kind = kind
        self.warmup_epochs = int(warmup_epochs)
        self.steps = [int(s) for s in steps]
        self.gamma = float(gamma)
        self.max_epochs = int(max_epochs)
        self.last_epoch = -1

    def multiplier(self, epoch):
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.steps, epoch)
        span = max(self.max_epochs - self.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))

    def lr_at(self, epoch):
        """The lr of the full-rate (head) group at `epoch`."""
        return self.base_lr * self.multiplier(epoch)

    def step(self, epoch):
        multiplier = self.multiplier(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_factor", 1.0) * multiplier
        self.last_epoch = epoch

    def state_dict(self):
        return {
            "base_lr": self.base_lr,
            "kind": self.kind,
            "warmup_epochs": self.warmup_epochs,
            "steps": list(self.steps),
            "gamma": self.gamma,
            "max_epochs": self.max_epochs,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state):
        """Restore the settings and the last epoch, and set the lrs of that epoch again."""
        self.base_lr = float(state["base_lr"])
        self.kind = state["kind"]
        self.warmup_epochs = int(state["warmup_epochs"])
        self.steps = [int(s) for s in state["steps"]]
        self.gamma = float(state["gamma"])
        self.max_epochs = int(state["max_epochs"])
        self.last_epoch = int(state["last_epoch"])
        if self.last_epoch >= 0:
            self.step(self.last_epoch)


def build_scheduler(cfg, optimizer):
    solver = cfg.SOLVER
    return EpochLRScheduler(
        optimizer,
        base_lr=solver.BASE_LR,
        kind=solver.SCHEDULER,
        warmup_epochs=solver.WARMUP_EPOCHS,
        steps=solver.STEPS,
        gamma=solver.GAMMA,
        max_epochs=solver.MAX_EPOCHS,
    )
