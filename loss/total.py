"""The CMFN training criterion: all loss terms, weighted (spec training_recipe.md 3.4).

``CMFNCriterion(cfg)(feat, logits, loss_ort, label_v, label_i, epoch) -> (total, terms)``

* ``feat`` [copies*2B, D]: pre-BN pooled features, rows ``[vis_orig, ir_orig, vis_br1,
  ir_br1, vis_br2, ir_br2]`` in blocks of B (``copies`` = 3 for CMFN, 1 for the baseline);
* ``logits`` [copies*2B, C]; ``loss_ort``: the model's orthogonality term (0 for 1 copy);
* ``label_v``, ``label_i`` [B]: identities of the visible and infrared rows.

With ``lab = [label_v; label_i]`` and ``labels = lab`` repeated per copy::

    total = ID_WEIGHT * CE(logits, labels) + TRI_WEIGHT * Tri(feat, labels)
          + CPM_WEIGHT * sum_k CPM([orig; branch_k], [lab; lab])      (k = 1..copies-1)
          + ORT_WEIGHT * loss_ort
          + c1(epoch) * sum_copies DCL(copy block, lab)

where ``c1(e) = DCL_WEIGHTS[bisect_right(DCL_MILESTONES, e)]``. ``terms`` holds the
unweighted ``id, tri, cpm, ort, dcl`` (cpm and dcl summed over pairs / copies), the weighted
``total`` and ``dcl_weight``, as Python floats. Terms whose weight is 0 are not computed
(reported as 0.0). All terms are computed in float32, also under autocast.
"""
import bisect

import torch
import torch.nn as nn

from loss.cpm import cpm_loss
from loss.cross_entropy import identity_loss
from loss.dcl import dcl_loss
from loss.distances import full_precision
from loss.triplet import triplet_loss
from utils.config import ConfigError

TERM_NAMES = ("id", "tri", "cpm", "ort", "dcl")


def dcl_weight_at(weights, milestones, epoch):
    """The DCL weight of `epoch`: weights[i] from epoch milestones[i-1] on."""
    return float(weights[bisect.bisect_right(milestones, epoch)])


def _check_schedule(weights, milestones):
    if len(weights) != len(milestones) + 1:
        raise ConfigError(
            "LOSS.DCL_WEIGHTS needs one entry more than LOSS.DCL_MILESTONES, got %d weights and %d milestones"
            % (len(weights), len(milestones))
        )
    if list(milestones) != sorted(milestones):
        raise ConfigError("LOSS.DCL_MILESTONES must be increasing, got %r" % (list(milestones),))


class CMFNCriterion(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        loss = cfg.LOSS
        _check_schedule(loss.DCL_WEIGHTS, loss.DCL_MILESTONES)
        if not 0.0 <= loss.LABEL_SMOOTH < 1.0:
            raise ConfigError("LOSS.LABEL_SMOOTH must be in [0, 1), got %r" % (loss.LABEL_SMOOTH,))
        self.label_smooth = float(loss.LABEL_SMOOTH)
        self.id_weight = float(loss.ID_WEIGHT)
        self.tri_weight = float(loss.TRI_WEIGHT)
        self.tri_margin = float(loss.TRI_MARGIN)
        self.cpm_weight = float(loss.CPM_WEIGHT)
        self.cpm_margin = float(loss.CPM_MARGIN)
        self.ort_weight = float(loss.ORT_WEIGHT)
        self.dcl_weights = [float(w) for w in loss.DCL_WEIGHTS]
        self.dcl_milestones = [int(m) for m in loss.DCL_MILESTONES]

    def dcl_weight(self, epoch):
        return dcl_weight_at(self.dcl_weights, self.dcl_milestones, epoch)

    def forward(self, feat, logits, loss_ort, label_v, label_i, epoch):
        batch = label_v.shape[0]
        if label_i.shape[0] != batch or batch == 0 or feat.shape[0] % (2 * batch):
            raise ValueError(
                "loss: feat has %d rows, expected copies * 2B with B = %d visible and %d infrared labels"
                % (feat.shape[0], label_v.shape[0], label_i.shape[0])
            )
        if logits.shape[0] != feat.shape[0]:
            raise ValueError("loss: logits have %d rows, feat has %d" % (logits.shape[0], feat.shape[0]))
        copies = feat.shape[0] // (2 * batch)
        feat = full_precision(feat)  # the losses run in float32 under autocast too
        lab = torch.cat([label_v, label_i])
        labels = lab.repeat(copies)
        blocks = feat.split(2 * batch)
        zero = feat.new_zeros(())
        dcl_weight = self.dcl_weight(epoch)

        values = dict.fromkeys(TERM_NAMES, zero)
        if self.id_weight:
            values["id"] = identity_loss(logits, labels, self.label_smooth)
        if self.tri_weight:
            values["tri"] = triplet_loss(feat, labels, self.tri_margin)
        if self.cpm_weight and copies > 1:
            pair_labels = torch.cat([lab, lab])
            values["cpm"] = sum(
                cpm_loss(torch.cat([blocks[0], branch]), pair_labels, self.cpm_margin) for branch in blocks[1:]
            )
        if self.ort_weight:
            values["ort"] = torch.as_tensor(loss_ort, device=feat.device).float()
        if dcl_weight:
            values["dcl"] = sum(dcl_loss(block, lab) for block in blocks)

        total = (
            self.id_weight * values["id"]
            + self.tri_weight * values["tri"]
            + self.cpm_weight * values["cpm"]
            + self.ort_weight * values["ort"]
            + dcl_weight * values["dcl"]
        )
        # one device-to-host transfer for all the logged numbers
        numbers = torch.stack([values[name].detach() for name in TERM_NAMES] + [total.detach()]).tolist()
        terms = dict(zip(TERM_NAMES + ("total",), numbers))
        terms["dcl_weight"] = dcl_weight
        return total, terms
