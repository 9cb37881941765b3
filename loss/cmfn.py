"""The CMFN training criterion (registered as "cmfn"; it also trains the baseline).

``criterion(outputs, batch, epoch) -> (total, terms, info)`` with the model outputs

* ``pool`` [copies*N, D]: pre-BN pooled features, the copies [orig; branch1; branch2] in
  blocks of N rows in batch order (``copies`` = 3 for CMFN, 1 for the baseline);
* ``logits`` [copies*N, C]; ``ort``: the model's orthogonality term (0 for 1 copy);

and a paired batch (N = 2B rows: B visible rows, then the B infrared rows of the same pairs;
``lab`` = ``batch["pids"]``, labels = ``lab`` repeated per copy)::

    total = ID_WEIGHT * CE(logits, labels) + TRI_WEIGHT * Tri(pool, labels)
          + CMFN.CPM_WEIGHT * sum_k CPM([orig; branch_k], [lab; lab])      (k = 1..copies-1)
          + CMFN.ORT_WEIGHT * ort
          + c1(epoch) * sum_copies DCL(copy block, lab)

where ``c1(e) = CMFN.DCL_WEIGHTS[bisect_right(CMFN.DCL_MILESTONES, e)]``. ``terms`` holds the
unweighted ``id, tri, cpm, ort, dcl`` (cpm and dcl summed over pairs / copies) and the
weighted ``total``; ``info`` holds ``dcl_weight``, all Python floats. Terms whose weight is 0
are not computed (reported as 0.0). All terms are computed in float32, also under autocast.
"""
import bisect

import torch

from loss.cpm import cpm_loss
from loss.cross_entropy import identity_loss
from loss.dcl import dcl_loss
from loss.distances import full_precision
from loss.base import Criterion
from loss.registry import CRITERIA
from loss.triplet import triplet_loss
from utils.errors import ConfigError

TERM_NAMES = ("id", "tri", "cpm", "ort", "dcl")


def dcl_weight_at(weights, milestones, epoch):
    """The DCL weight of `epoch`: weights[i] from epoch milestones[i-1] on."""
    return float(weights[bisect.bisect_right(milestones, epoch)])


def _check_schedule(weights, milestones):
    if len(weights) != len(milestones) + 1:
        raise ConfigError(
            "LOSS.CMFN.DCL_WEIGHTS needs one entry more than LOSS.CMFN.DCL_MILESTONES, got %d weights and %d milestones"
            % (len(weights), len(milestones))
        )
    if list(milestones) != sorted(milestones):
        raise ConfigError("LOSS.CMFN.DCL_MILESTONES must be increasing, got %r" % (list(milestones),))


@CRITERIA.register("cmfn")
class CMFNCriterion(Criterion):
    required_outputs = ("pool", "logits", "ort")

    def __init__(self, cfg):
        super().__init__()
        own = cfg.LOSS.CMFN
        _check_schedule(own.DCL_WEIGHTS, own.DCL_MILESTONES)
        self.read_common(cfg)
        self.cpm_weight = float(own.CPM_WEIGHT)
        self.cpm_margin = float(own.CPM_MARGIN)
        self.ort_weight = float(own.ORT_WEIGHT)
        self.dcl_weights = [float(w) for w in own.DCL_WEIGHTS]
        self.dcl_milestones = [int(m) for m in own.DCL_MILESTONES]

    def dcl_weight(self, epoch):
        return dcl_weight_at(self.dcl_weights, self.dcl_milestones, epoch)

    def forward(self, outputs, batch, epoch):
        feat, logits, loss_ort = outputs["pool"], outputs["logits"], outputs["ort"]
        lab, modality = batch["pids"], batch["modality"]
        n = lab.shape[0]
        batch = n // 2
        paired = torch.arange(n, device=modality.device) >= batch
        if n == 0 or n % 2 or bool((modality != paired).any()):
            raise ValueError("the CMFN criterion needs paired batches (B visible rows, then B infrared rows; "
                             "DATALOADER.SAMPLER cross_modality or balanced)")
        if feat.shape[0] % (2 * batch):
            raise ValueError("loss: pool has %d rows, expected copies * %d" % (feat.shape[0], 2 * batch))
        if logits.shape[0] != feat.shape[0]:
            raise ValueError("loss: logits have %d rows, pool has %d" % (logits.shape[0], feat.shape[0]))
        copies = feat.shape[0] // (2 * batch)
        feat = full_precision(feat)  # the losses run in float32 under autocast too
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
        return total, self.as_floats(values, total), {"dcl_weight": dcl_weight}
