"""Training losses of CMFN (spec training_recipe.md 3.4).

``build_loss(cfg)`` returns the criterion registered for ``cfg.MODEL.NAME`` in ``LOSSES``
(name -> class taking ``cfg``); see :mod:`loss.total` for its call signature. The single
losses live in their own modules: cross_entropy, triplet, cpm, orthogonality, dcl.
"""
from loss.cpm import cpm_loss
from loss.cross_entropy import identity_loss
from loss.dcl import dcl_loss
from loss.orthogonality import orthogonality
from loss.total import CMFNCriterion, dcl_weight_at
from loss.triplet import triplet_loss
from utils.config import ConfigError

# The baseline (one copy) trains with the same recipe: no CPM, DCL on its single block.
LOSSES = {
    "cmfn": CMFNCriterion,
    "baseline": CMFNCriterion,
}


def build_loss(cfg):
    name = cfg.MODEL.NAME
    if name not in LOSSES:
        raise ConfigError("MODEL.NAME %r has no registered loss; known: %s" % (name, ", ".join(sorted(LOSSES))))
    return LOSSES[name](cfg)


__all__ = [
    "LOSSES",
    "build_loss",
    "CMFNCriterion",
    "dcl_weight_at",
    "identity_loss",
    "triplet_loss",
    "cpm_loss",
    "dcl_loss",
    "orthogonality",
]
