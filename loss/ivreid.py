"""The IV-REID training criterion: shared and per-modality identity losses, mutual KL between
the two auxiliary modality classifiers, and a batch-hard triplet.

``IVReIDCriterion(cfg)(outputs, batch, epoch) -> (total, terms, info)`` reads the model
outputs ``logits`` [N, C] (shared classifier), ``aux_logits_visible`` and
``aux_logits_infrared`` [N, C] (the two auxiliary heads, each run on every row), ``feat``
[N, D] (post-BNNeck) and ``pool`` [N, D] (pre-BN), with ``batch["pids"]`` [N] and
``batch["modality"]`` [N] (0 visible, 1 infrared). Rows are split by that modality label, so
any row order works. With V / I the visible / infrared rows, ``s_v`` / ``s_i`` the two heads'
logits and ``sg`` a stopped gradient::

    kl_visible  = KL(softmax(sg(s_i[V])) || softmax(s_v[V]))
    kl_infrared = KL(softmax(sg(s_v[I])) || softmax(s_i[I]))
    id          = CE(logits, pids)
    id_visible  = CE(s_v[V], pids[V]);   id_infrared = CE(s_i[I], pids[I])
    tri         = batch-hard triplet(outputs[LOSS.IVREID.TRI_FEATURE], pids, LOSS.TRI_MARGIN)

    total = KL_WEIGHT * (kl_visible + kl_infrared)
          + (ID_WEIGHT * id + AUX_ID_WEIGHT * id_visible + AUX_ID_WEIGHT * id_infrared)
          + TRI_WEIGHT * tri

Each head learns its own modality's identities and is pulled toward the other head's
prediction on the same rows (the target is detached: the gradient of a KL term reaches only
the head it trains). The KL reduction is ``LOSS.IVREID.KL_REDUCTION``: ``batchmean`` (sum /
rows) or ``mean`` (sum / (rows x classes)). The CE terms use ``LOSS.LABEL_SMOOTH``. The sums
are grouped as above, so with unit weights the total equals, bit for bit, the released
``(kl_rgb + kl_ir) + ((id_shared + id_rgb) + id_ir) + triplet``. Everything is computed in
float32, also under autocast. ``terms`` holds the six unweighted terms and ``total``;
``info`` is empty.
"""
import warnings

import torch
import torch.nn.functional as F

from loss.base import Criterion
from loss.cross_entropy import identity_loss
from loss.distances import full_precision
from loss.registry import CRITERIA
from loss.triplet import triplet_loss

VISIBLE, INFRARED = 0, 1


def mutual_kl(student_logits, teacher_logits, reduction):
    """KL(softmax(teacher) || softmax(student)) over rows [n, C]; the teacher is detached.

    ``reduction``: ``batchmean`` (sum / n) or ``mean`` (sum / (n * C)).
    """
    log_probs = F.log_softmax(student_logits, dim=1)
    target = F.softmax(teacher_logits.detach(), dim=1)
    with warnings.catch_warnings():
        # 'mean' is the released RegDB reduction on purpose; torch warns about it on every call.
        warnings.filterwarnings("ignore", message="reduction: 'mean' divides", category=UserWarning)
        return F.kl_div(log_probs, target, reduction=reduction)


@CRITERIA.register("ivreid")
class IVReIDCriterion(Criterion):
    """The six IV-REID terms and their weighted total; see the module docstring."""

    required_outputs = ("feat", "pool", "logits", "aux_logits_visible", "aux_logits_infrared")

    def __init__(self, cfg):
        super().__init__()
        self.read_common(cfg)
        own = cfg.LOSS.IVREID
        self.aux_id_weight = float(own.AUX_ID_WEIGHT)
        self.kl_weight = float(own.KL_WEIGHT)
        self.kl_reduction = own.KL_REDUCTION
        self.tri_feature = own.TRI_FEATURE

    @staticmethod
    def modality_rows(modality):
        """(visible row indices, infrared row indices), ascending; ValueError unless both exist."""
        visible = torch.nonzero(modality == VISIBLE).squeeze(1)
        infrared = torch.nonzero(modality == INFRARED).squeeze(1)
        # the counts are on the host already (nonzero synchronises): no extra transfer
        if len(visible) + len(infrared) != len(modality):
            raise ValueError("ivreid loss: batch['modality'] must be 0 (visible) or 1 (infrared), got %s"
                             % sorted(set(modality.tolist())))
        if not len(visible) or not len(infrared):
            raise ValueError("ivreid loss: the batch has %d visible and %d infrared rows; each auxiliary head needs "
                             "rows of its modality (a paired sampler such as DATALOADER.SAMPLER balanced gives both)"
                             % (len(visible), len(infrared)))
        return visible, infrared

    def forward(self, outputs, batch, epoch):
        pids = batch["pids"]
        visible, infrared = self.modality_rows(batch["modality"])
        s_vis = full_precision(outputs["aux_logits_visible"])
        s_ir = full_precision(outputs["aux_logits_infrared"])
        vis_logits, ir_logits = s_vis[visible], s_ir[infrared]
        values = {
            "kl_visible": mutual_kl(vis_logits, s_ir[visible], self.kl_reduction),
            "kl_infrared": mutual_kl(ir_logits, s_vis[infrared], self.kl_reduction),
            "id": identity_loss(outputs["logits"], pids, self.label_smooth),
            "id_visible": identity_loss(vis_logits, pids[visible], self.label_smooth),
            "id_infrared": identity_loss(ir_logits, pids[infrared], self.label_smooth),
            "tri": triplet_loss(outputs[self.tri_feature], pids, self.tri_margin),  # float32 inside
        }
        total = (
            self.kl_weight * (values["kl_visible"] + values["kl_infrared"])
            + (self.id_weight * values["id"] + self.aux_id_weight * values["id_visible"]
               + self.aux_id_weight * values["id_infrared"])
            + self.tri_weight * values["tri"]
        )
        return total, self.as_floats(values, total), {}
