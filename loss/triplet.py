"""Batch-hard triplet loss over all rows jointly (LOSS.TRI_MARGIN, released 0.3).

``triplet_loss(feat [N, D], labels [N], margin) -> scalar``: for every row, the farthest
same-label row (the row itself included, as released) and the closest other-label row by
Euclidean distance; the loss is ``mean(relu(d_ap - d_an + margin))``. Rows of every
modality and every MBUE copy are mixed, so positives and negatives may come from any of
them. Same values and gradients as the released ``OriTripletLoss``.
"""
import torch.nn.functional as F

from loss.distances import pairwise_euclidean


def triplet_loss(feat, labels, margin=0.3):
    dist = pairwise_euclidean(feat, feat)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()
