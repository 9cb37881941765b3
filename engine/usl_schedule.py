"""Cosine annealing with a floor, stepped once per epoch: the schedule of the unsupervised stages.

With base lr v, floor ``eta_min`` and period ``t_max`` (which need not equal the number of
epochs run), epoch e (0-based) trains at::

    lr(e) = eta_min + (v - eta_min) * (1 + cos(pi * e / t_max)) / 2

:func:`cosine_annealing_lr` returns the value ``torch.optim.lr_scheduler.CosineAnnealingLR``
holds after e calls of ``step()``: torch computes it recursively from the previous epoch's
lr, which differs from the closed form above in the last bits, so the recursion is replayed
to keep runs (and resumed runs) bitwise equal to the released ones.
:func:`closed_form_cosine_lr` is the formula itself. :class:`CosineAnnealing` sets that lr in
every parameter group of an optimizer at the start of each epoch.
"""
import math

from utils.errors import ConfigError


def closed_form_cosine_lr(base_lr, epoch, t_max, eta_min=0.0):
    """The closed-form lr of `epoch` (module docstring)."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2


def cosine_annealing_lr(base_lr, epoch, t_max, eta_min=0.0):
    """The lr torch's CosineAnnealingLR(t_max, eta_min) gives after `epoch` steps from `base_lr`."""
    if t_max < 1:
        raise ConfigError("cosine annealing: T_max must be >= 1, got %r" % (t_max,))
    if epoch < 0:
        raise ValueError("cosine annealing: epoch must be >= 0, got %r" % (epoch,))
    lr = base_lr
    for e in range(1, int(epoch) + 1):
        if (e - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = ((1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
                  * (lr - eta_min) + eta_min)
    return lr


class CosineAnnealing:
    """Sets every group's lr to ``cosine_annealing_lr(base_lr, epoch, t_max, eta_min)``.

    ``step(epoch)`` is called at the start of each epoch; the lr depends on the epoch only,
    so ``state_dict()`` / ``load_state_dict()`` just carry the settings and the last epoch.
    """

    def __init__(self, optimizer, base_lr, t_max, eta_min=0.0):
        if t_max < 1:
            raise ConfigError("cosine annealing: T_max must be >= 1, got %r" % (t_max,))
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.t_max = int(t_max)
        self.eta_min = float(eta_min)
        self.last_epoch = -1

    def lr_at(self, epoch):
        return cosine_annealing_lr(self.base_lr, epoch, self.t_max, self.eta_min)

    def step(self, epoch):
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_epoch = int(epoch)

    def state_dict(self):
        return {"base_lr": self.base_lr, "t_max": self.t_max, "eta_min": self.eta_min, "last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        """Restore the settings and set the last epoch's lr again."""
        self.base_lr = float(state["base_lr"])
        self.t_max = int(state["t_max"])
        self.eta_min = float(state["eta_min"])
        self.last_epoch = -1
        if int(state["last_epoch"]) >= 0:
            self.step(int(state["last_epoch"]))
