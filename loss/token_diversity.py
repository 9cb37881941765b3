"""Token-diversity loss: pushes the K class tokens of each sample apart.

``token_diversity_loss(tokens [B, K, C], dynamic_balancer=True) -> 0-d tensor``. For each
sample b and each of the K(K-1)/2 token pairs p < q (row-major order of the upper triangle)::

    s_b(p, q) = |<t_bp, t_bq>| / (|t_bp| |t_bq|)          (no epsilon: a zero token gives NaN)

With the dynamic balancer the pairs are weighted by a softmax of their own similarities,
``L = mean_b sum_pairs softmax(s_b) * s_b``, so the most similar pairs dominate; without it
``L = mean(s)``. The input is the raw (pre-BatchNorm) class tokens; a list of K tensors
[B, C] is stacked along dim 1. Computed in float32 or wider with autocast disabled.
"""
import torch
import torch.nn.functional as F

from loss.distances import full_precision


def token_diversity_loss(tokens, dynamic_balancer=True):
    """The diversity loss of `tokens` [B, K, C] (or a list of K [B, C]); module docstring."""
    if isinstance(tokens, (list, tuple)):
        tokens = torch.stack(list(tokens), dim=1)
    if tokens.dim() != 3 or tokens.shape[1] < 2:
        raise ValueError("token_diversity_loss expects [B, K, C] with K >= 2, got %s" % (tuple(tokens.shape),))
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        tokens = full_precision(tokens)
        norms = tokens.pow(2).sum(dim=2, keepdim=True).sqrt()
        cosine = (tokens @ tokens.transpose(1, 2)) / (norms * norms.transpose(1, 2))
        k = tokens.shape[1]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=tokens.device), diagonal=1)
        similarity = cosine.abs()[:, upper]
        if dynamic_balancer:
            return (F.softmax(similarity, dim=1) * similarity).sum(dim=1).mean()
        return similarity.mean()
