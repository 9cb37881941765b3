"""Geometry shared by the metric losses (triplet, CPM, DCL): pairwise Euclidean distances
and per-identity centres.

``pairwise_euclidean(a [M, D], b [N, D]) -> [M, N]`` computes
``sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12))``: the expanded form used by the released
losses, whose golden values and gradients the project reproduces. The clamp keeps the
square root differentiable when a distance is (numerically) zero.

``identity_centres(feat [N, D], labels [N])`` returns the mean row of each identity
(centres [n, D], sorted ids [n], counts [n]).

Both run in float32 or wider with autocast disabled: under bf16/fp16
autocast the expanded form loses everything to cancellation.
"""
import torch

_MIN_SQUARED = 1e-12


def full_precision(x):
    """`x` as float32 unless it is already float32 or float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _no_autocast(x):
    return torch.autocast(device_type=x.device.type, enabled=False)


def pairwise_euclidean(a, b):
    """Euclidean distance matrix [M, N] between the rows of `a` [M, D] and `b` [N, D]."""
    with _no_autocast(a):
        a, b = full_precision(a), full_precision(b)
        squared = a.pow(2).sum(dim=1, keepdim=True) + b.pow(2).sum(dim=1).unsqueeze(0)
        squared = torch.addmm(squared, a, b.t(), beta=1.0, alpha=-2.0)
        return squared.clamp(min=_MIN_SQUARED).sqrt()


def identity_centres(feat, labels):
    """Per-identity mean rows: (centres [n, D] in sorted id order, ids [n], counts [n])."""
    ids, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    # a one-hot matmul rather than index_add: deterministic on GPU as well
    with _no_autocast(feat):
        feat = full_precision(feat)
        members = torch.nn.functional.one_hot(inverse, len(ids)).t().to(feat.dtype)
        return (members @ feat) / counts.unsqueeze(1).to(feat.dtype), ids, counts
