"""The criterion contract shared by every registered criterion.

A criterion registered in :data:`loss.registry.CRITERIA` subclasses :class:`Criterion`, is
built as ``cls(cfg)`` and is called as ``criterion(outputs, batch, epoch)``:

* ``outputs``: the model's training dict; the criterion lists the names it reads in
  ``required_outputs`` (checked against the model's ``train_outputs`` when the run is built);
* ``batch``: the training batch dict (``images``, ``pids``, ``camids``, ``modality``,
  ``index``), on the model's device;
* ``epoch``: the 0-based epoch, for schedules.

It returns ``(total, terms, info)``: ``total`` the 0-d loss to back-propagate; ``terms`` a
dict of Python floats, its unweighted terms and ``total`` (logged and checked for
non-finite values); ``info`` a dict of Python floats, schedule values such as a loss weight of
this epoch (logged, never checked).
"""
import torch
from torch import nn

from utils.errors import ConfigError


class Criterion(nn.Module):
    required_outputs = ()

    def read_common(self, cfg):
        """The shared LOSS keys: identity CE weight and label smoothing, triplet weight and margin."""
        loss = cfg.LOSS
        if not 0.0 <= loss.LABEL_SMOOTH < 1.0:
            raise ConfigError("LOSS.LABEL_SMOOTH must be in [0, 1), got %r" % (loss.LABEL_SMOOTH,))
        self.label_smooth = float(loss.LABEL_SMOOTH)
        self.id_weight = float(loss.ID_WEIGHT)
        self.tri_weight = float(loss.TRI_WEIGHT)
        self.tri_margin = float(loss.TRI_MARGIN)

    @staticmethod
    def as_floats(values, total):
        """``{name: float}`` of 0-d tensors plus ``total``, with one device-to-host transfer."""
        names = list(values)
        # float64 holds a float32 value exactly and keeps a float64 run's terms whole
        numbers = torch.stack([values[k].detach().double() for k in names] + [total.detach().double()]).tolist()
        return dict(zip(names + ["total"], numbers))


def check_outputs(criterion, model_cls):
    """Raise a ConfigError when the model does not produce an output the criterion needs."""
    missing = [k for k in criterion.required_outputs if k not in model_cls.train_outputs]
    if missing:
        raise ConfigError("LOSS.NAME %s needs the model outputs %s, which MODEL.NAME %s does not produce (it gives %s)"
                          % (type(criterion).__name__, ", ".join(missing), model_cls.__name__,
                             ", ".join(model_cls.train_outputs)))
