"""Batch-hard triplet loss over all rows jointly.

``triplet_loss(feat [N, D], labels [N], margin=0.3) -> scalar``: for every row, the farthest
same-label row (the row itself included, as released: its distance is 1e-6 after the clamp of
:func:`loss.distances.pairwise_euclidean`) and the closest other-label row by Euclidean
distance on the raw features. With a margin the loss is ``mean(relu(d_ap - d_an + margin))``
(CMFN's ``OriTripletLoss``, IV-REID; LOSS.TRI_MARGIN); with ``margin=None`` it is the
soft-margin form ``mean(log(1 + exp(-(d_an - d_ap))))`` (FusionReID's ``TripletLoss()``,
computed as ``soft_margin_loss(d_an - d_ap, 1)`` like the released class). Rows of every
modality and every copy are mixed, so positives and negatives may come from any of them.
``hardest_distances`` returns the (d_ap, d_an) pair [N] each.

The released FusionReID mining reshapes the masked distances per row and so needs every label
to occur equally often in the batch; the masked max / min here gives the same values then and
also works for unequal counts.
"""
import torch
import torch.nn.functional as F

from loss.distances import pairwise_euclidean


def hardest_distances(feat, labels):
    """(farthest same-label distance [N], closest other-label distance [N])."""
    dist = pairwise_euclidean(feat, feat)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    return hardest_pos, hardest_neg


def triplet_loss(feat, labels, margin=0.3):
    hardest_pos, hardest_neg = hardest_distances(feat, labels)
    if margin is None:
        return F.soft_margin_loss(hardest_neg - hardest_pos, torch.ones_like(hardest_pos))
    return F.relu(hardest_pos - hardest_neg + margin).mean()
