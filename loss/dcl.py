"""Discriminative centre loss (DCL), which CMFN takes from PMT.

``dcl_loss(feat [N, D], labels [N]) -> scalar`` for one block of rows (the visible and
infrared rows of one MBUE copy, labels ``[l_v; l_i]``):

* each identity's centre is the mean of all its rows (both modalities);
* d = Euclidean distances from every centre to every row [n_ids, N];
* pos_mean = mean of all centre-to-same-identity distances;
* per centre, its "hard" negatives are the other-identity distances below that centre's
  mean negative distance; neg_mean = mean over centres of the mean hard-negative distance
  (centres without any hard negative are left out);
* DCL = pos_mean / neg_mean.

The hard-negative selection carries no gradient; everything else (centres included) does.
Values and gradients equal the released ``DCL(num_pos=4, feat_norm="no")``.
"""
from loss.distances import identity_centres, pairwise_euclidean


def _masked_mean(values, mask, dim=None):
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def dcl_loss(feat, labels):
    centres, ids, _ = identity_centres(feat, labels)
    if len(ids) < 2:
        raise ValueError("DCL needs at least two identities in a block, got %d" % len(ids))
    dist = pairwise_euclidean(centres, feat)
    positive = ids.unsqueeze(1) == labels.unsqueeze(0)
    negative = ~positive
    pos_mean = _masked_mean(dist, positive)

    mean_negative = _masked_mean(dist, negative, dim=1)
    hard = negative & (dist < mean_negative.unsqueeze(1))
    hard_mean = _masked_mean(dist, hard, dim=1)
    neg_mean = _masked_mean(hard_mean, hard.any(dim=1))
    return pos_mean / neg_mean
