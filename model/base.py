"""The model contract shared by every registered model.

A model class registered in :data:`model.registry.MODELS` subclasses :class:`ReIDModel` and

* is built by ``cls.from_config(cfg, num_classes)``;
* is called as ``model(images [N, 3, H, W], modality [N] int64, camids [N] int64 or None)``,
  ``modality`` holding :data:`VISIBLE` (0) or :data:`INFRARED` (1) per row (a plain string
  "visible" / "infrared" stands for all rows); models that ignore the modality or the camera
  accept them all the same;
* in train mode returns a dict of named tensors, whose names it lists in ``train_outputs``
  (a criterion declares the names it needs and the run checks them when it is built);
* in eval mode returns a dict ``set name -> [N, D]`` of L2-normalised embeddings, the names
  listed in ``embedding_sets``;
* declares ``embedding_presets`` (preset name -> {set name: weight}) and
  ``default_embedding``: the test embedding of a preset is the weighted sum of the sets'
  similarities (equivalently, the concatenation of the sqrt(weight)-scaled sets);
* returns its optimiser groups from ``param_groups(cfg)``: dicts with ``name``, ``params``
  and ``lr_factor`` (the lr is ``SOLVER.BASE_LR * lr_factor``), optionally ``weight_decay``.

The class attributes can be read without building a model, which is how the config is
validated at start-up (``TEST.FEATURE`` must be one of the presets).
"""
import torch
from torch import nn

VISIBLE, INFRARED = 0, 1
MODALITY_NAMES = {"visible": VISIBLE, "infrared": INFRARED}


def modality_ids(modality, n, device=None):
    """``modality`` as an int64 tensor [n]: a per-row tensor unchanged, a name broadcast."""
    if isinstance(modality, str):
        if modality not in MODALITY_NAMES:
            raise ValueError("modality must be 'visible' or 'infrared', got %r" % (modality,))
        return torch.full((n,), MODALITY_NAMES[modality], dtype=torch.int64, device=device)
    modality = torch.as_tensor(modality, device=device)
    if modality.shape != (n,):
        raise ValueError("modality must hold one entry per row ([%d]), got shape %s" % (n, tuple(modality.shape)))
    return modality


class ReIDModel(nn.Module):
    """Base class of the registered models; see the module docstring for the contract."""

    train_outputs = ()
    embedding_sets = ()
    embedding_presets = {}
    default_embedding = ""

    @classmethod
    def from_config(cls, cfg, num_classes):
        raise NotImplementedError

    def param_groups(self, cfg):
        """Default: ``head.*`` at the full rate, everything else at SOLVER.BACKBONE_LR_FACTOR."""
        head, rest = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (head if name.startswith("head.") else rest).append(param)
        groups = [{"name": "head", "params": head, "lr_factor": 1.0},
                  {"name": "backbone", "params": rest, "lr_factor": float(cfg.SOLVER.BACKBONE_LR_FACTOR)}]
        return [g for g in groups if g["params"]]

    @classmethod
    def embedding_weights(cls, preset=""):
        """[(set name, weight)] of `preset` (empty: the default), in ``embedding_sets`` order."""
        preset = preset or cls.default_embedding
        if preset not in cls.embedding_presets:
            raise ValueError("embedding %r is not one of the %s presets (%s)"
                             % (preset, cls.__name__, ", ".join(cls.embedding_presets)))
        weights = cls.embedding_presets[preset]
        return [(name, float(weights[name])) for name in cls.embedding_sets if name in weights]
