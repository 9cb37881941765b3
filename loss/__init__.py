"""Training losses and criteria.

``build_criterion(cfg)`` returns the criterion registered as ``cfg.LOSS.NAME`` in
``CRITERIA`` (contract: :mod:`loss.base`). The single losses live in their own modules:
cross_entropy, triplet, cpm, orthogonality, dcl; each system's criterion in its own module
(cmfn, ivreid).
"""
from loss.base import Criterion, check_outputs
from loss.cpm import cpm_loss
from loss.cross_entropy import identity_loss
from loss.dcl import dcl_loss
from loss.orthogonality import orthogonality_loss
from loss.registry import CRITERIA
from loss.triplet import triplet_loss


def build_criterion(cfg):
    return CRITERIA.get(cfg.LOSS.NAME)(cfg)


__all__ = [
    "CRITERIA",
    "Criterion",
    "build_criterion",
    "check_outputs",
    "identity_loss",
    "triplet_loss",
    "cpm_loss",
    "dcl_loss",
    "orthogonality_loss",
]
