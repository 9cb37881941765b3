"""Query-by-gallery distance matrices from feature matrices.

``compute_distance(qf [nq, d], gf [ng, d], metric, dtype=torch.float32)`` returns a tensor
[nq, ng] of `dtype` (float32 or float64) on the features' device in which smaller means closer,
as evaluation.metrics.evaluate expects:

* ``cosine``: ``-(q @ g.T)`` on the features as given. The models return L2-normalised
  embeddings, so this is the negative cosine similarity the released test code evaluates
  (``eval_*(-distmat)``); the released code does not renormalise (the summed flip features
  are not unit length either). ``normalize=True`` L2-normalises both sides first.
* ``euclidean``: ``sqrt(clamp(|q|^2 + |g|^2 - 2 q.g, min=0))``, the Euclidean distance;
  ``squared=True`` skips the square root (same ranking, what k-reciprocal re-ranking squares).

Rows are computed in blocks of ``block_size`` queries so the temporaries stay at
``block_size x ng`` values. Half and bfloat16 inputs are upcast. With ``dtype=torch.float32``
products accumulate in float32 (float64 inputs are computed in float64) and the result is
float32. With ``dtype=torch.float64`` the features are upcast to float64 first, so products
accumulate in float64 and distances closer than float32 resolution (about 1.2e-7 relative)
keep their order; test.py reports such distances (TEST.DISTANCE_DTYPE).
"""
import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("cosine", "euclidean")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def distance_dtype(dtype):
    """torch.float32 or torch.float64 from a dtype or its name ("float32", "float64")."""
    t = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if t not in (torch.float32, torch.float64):
        raise ValueError("distance dtype must be float32 or float64, got %r" % (dtype,))
    return t


def _features(x, name):
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 2:
        raise ValueError("%s must be a 2-D [n, dim] feature matrix, got shape %s" % (name, tuple(t.shape)))
    if not t.dtype.is_floating_point:
        raise ValueError("%s must be floating point, got dtype %s" % (name, t.dtype))
    return t if t.dtype == torch.float64 else t.float()


def compute_distance(qf, gf, metric="cosine", normalize=False, squared=False, block_size=4096,
                     dtype=torch.float32):
    """Distance matrix [nq, ng] (`dtype`, on qf's device) between query and gallery features.

    qf [nq, d], gf [ng, d]: numpy arrays or tensors (gf is moved to qf's device).
    metric: "cosine" (negative inner product) or "euclidean" (module docstring).
    normalize: L2-normalise the features first. squared: euclidean without the square root.
    dtype: torch.float32 or torch.float64 (or their names), the precision of the result;
    float64 also computes the products in float64.
    """
    dtype = distance_dtype(dtype)
    if metric not in METRICS:
        raise ValueError("unknown distance metric %r; expected one of %s" % (metric, ", ".join(METRICS)))
    q = _features(qf, "query features")
    g = _features(gf, "gallery features").to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError("query features have dimension %d but gallery features %d" % (q.shape[1], g.shape[1]))
    if q.dtype != g.dtype or dtype == torch.float64:
        q, g = q.double(), g.double()
    if normalize:
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    block_size = max(1, int(block_size))
    out = torch.empty(q.shape[0], g.shape[0], dtype=dtype, device=q.device)
    g_sq = (g * g).sum(1) if metric == "euclidean" else None
    for s in range(0, q.shape[0], block_size):
        qb = q[s:s + block_size]
        prod = qb @ g.T
        if metric == "cosine":
            out[s:s + block_size] = -prod
        else:
            d2 = ((qb * qb).sum(1, keepdim=True) + g_sq - 2 * prod).clamp_(min=0)
            out[s:s + block_size] = d2 if squared else d2.sqrt_()
    return out
