"""CMAG's EMA teacher: an exponential moving average of the encoder's parameters.

:class:`EMATeacher` holds ``module``, a frozen copy of the encoder made when it is created
(CMAG's stage 2 starts it from the stage-1 model). After every optimiser step
:meth:`EMATeacher.update` moves each parameter of the copy towards the student's::

    ema <- alpha * ema + (1 - alpha) * param        (alpha 0.999 as released)

over the zipped ``parameters()`` only: buffers (BatchNorm running statistics) are not averaged
and keep the values they had when the copy was made, as released (``sync_buffers=True`` copies
the student's buffers at each update instead, an opt-in correction for evaluating the teacher).
The released trainer updates the copy every step and never runs it, so it has no influence on
training; this project can evaluate and select with it instead of the student
(:meth:`EMATeacher.evaluation_model`). Its ``state_dict()`` holds every parameter and buffer of
the copy, so a resumed run continues bitwise.
"""
import copy

import torch
from torch import nn

from engine.distributed import unwrap_model
from utils.errors import ConfigError


class EMATeacher(nn.Module):
    """A frozen copy of `model` updated as an EMA of its parameters (module docstring)."""

    def __init__(self, model, alpha=0.999, sync_buffers=False, evaluate=False):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("EMA alpha must be in [0, 1], got %r" % (alpha,))
        self.alpha = float(alpha)
        self.sync_buffers = bool(sync_buffers)
        self.evaluate = bool(evaluate)
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, model):
        """From ``USL.CMAG.EMA_ALPHA``, ``USL.CMAG.EMA_SYNC_BUFFERS`` and ``USL.CMAG.EVAL_WITH_EMA``."""
        cmag = cfg.USL.CMAG
        if not 0.0 <= cmag.EMA_ALPHA <= 1.0:
            raise ConfigError("USL.CMAG.EMA_ALPHA must be in [0, 1], got %r" % (cmag.EMA_ALPHA,))
        return cls(model, alpha=cmag.EMA_ALPHA, sync_buffers=cmag.EMA_SYNC_BUFFERS, evaluate=cmag.EVAL_WITH_EMA)

    def extra_repr(self):
        return "alpha=%g, sync_buffers=%s, evaluate=%s" % (self.alpha, self.sync_buffers, self.evaluate)

    @torch.no_grad()
    def update(self, model):
        """One EMA step towards the parameters of `model` (the student, same architecture)."""
        student = unwrap_model(model)
        teacher_params, student_params = list(self.module.parameters()), list(student.parameters())
        if len(teacher_params) != len(student_params):
            raise ValueError("EMA update: the teacher has %d parameters, the student %d"
                             % (len(teacher_params), len(student_params)))
        for ema, param in zip(teacher_params, student_params):
            ema.mul_(self.alpha).add_(param.detach(), alpha=1.0 - self.alpha)
        if self.sync_buffers:
            for ema, buffer in zip(self.module.buffers(), student.buffers()):
                ema.copy_(buffer)

    def evaluation_model(self, student):
        """The model to evaluate and select with: the teacher when ``evaluate`` is set, else `student`."""
        return self.module if self.evaluate else student

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
