"""The FusionReID training criterion: label-smoothed cross-entropy plus the soft-margin
batch-hard triplet on each of the six heads, summed.

``FusionReIDCriterion(cfg)(outputs, batch, epoch) -> (total, terms, info)`` reads, for each
head name ``h`` of ``LOSS.FUSIONREID.HEADS`` (the released order: the ResNet and ViT
backbone heads, the two LRU heads, the two HTM heads), the model outputs ``logits_<h>``
[N, C] and ``feat_<h>`` [N, D] (pre-BN), and ``batch["pids"]`` [N]::

    head_h = ID_WEIGHT * CE_eps(logits_h, pids) + TRI_WEIGHT * Tri(feat_h, pids)
    total  = head_1 + head_2 + ... + head_6            (summed in head order, as released)

``CE_eps`` is cross-entropy against ``(1 - eps) * onehot + eps / C`` with eps =
``LOSS.LABEL_SMOOTH`` (0.1 in the FusionReID presets); ``Tri`` is the batch-hard triplet of
:mod:`loss.triplet`, soft-margin when ``LOSS.FUSIONREID.SOFT_MARGIN`` (released) and with the
hinge margin ``LOSS.TRI_MARGIN`` otherwise, on the raw features. ``terms`` holds ``id`` and
``tri`` (each summed over the heads) and ``total``; ``info`` is empty. Everything is computed in
float32 (or float64 for a float64 model), also under autocast. The released losses move their
targets to CUDA; these run on any device.
"""
from loss.base import Criterion
from loss.cross_entropy import identity_loss
from loss.registry import CRITERIA
from loss.triplet import triplet_loss
from utils.errors import ConfigError

# The released heads, the default of LOSS.FUSIONREID.HEADS.
HEADS = ("cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit")


def _outputs(heads):
    return tuple(name for h in heads for name in ("logits_" + h, "feat_" + h))


@CRITERIA.register("fusionreid")
class FusionReIDCriterion(Criterion):
    """The six-head LS-CE + triplet sum; see the module docstring."""

    required_outputs = _outputs(HEADS)

    def __init__(self, cfg):
        super().__init__()
        self.read_common(cfg)
        own = cfg.LOSS.FUSIONREID
        self.heads = tuple(own.HEADS)
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError("LOSS.FUSIONREID.HEADS must name distinct heads, got %r" % (list(own.HEADS),))
        self.margin = None if own.SOFT_MARGIN else self.tri_margin
        self.required_outputs = _outputs(self.heads)

    def forward(self, outputs, batch, epoch):
        pids = batch["pids"]
        total = id_sum = tri_sum = None
        for h in self.heads:
            ce = identity_loss(outputs["logits_" + h], pids, self.label_smooth)
            tri = triplet_loss(outputs["feat_" + h], pids, self.margin)
            head = self.id_weight * ce + self.tri_weight * tri
            total = head if total is None else total + head
            id_sum = ce if id_sum is None else id_sum + ce
            tri_sum = tri if tri_sum is None else tri_sum + tri
        return total, self.as_floats({"id": id_sum, "tri": tri_sum}, total), {}
