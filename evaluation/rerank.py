"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), memory-bounded. Off by default (cfg.TEST.RERANK).

``k_reciprocal_rerank(q_g [nq, ng], q_q [nq, nq], g_g [ng, ng], k1, k2, lambda_value)`` returns
a re-ranked distance [nq, ng] (float32 or, with ``dtype=torch.float64``, float64; smaller =
closer) for evaluation.metrics.evaluate.

Inputs: squared Euclidean distances. The re-ranking authors' distance-matrix code squares the
Euclidean distances it is given, and the feature-based re-ranking of the common re-id
codebases (torchreid, fast-reid) works on squared Euclidean distances of the test features
too; evaluation.embeddings passes the squared Euclidean distances of the (weighted,
concatenated) test features for all three matrices, whatever TEST.DISTANCE ranks with when
re-ranking is off. A cosine distance
``-(q.g)`` is equivalent only when every feature has unit norm (see step 1); the flip-summed
features of test.py have norms up to 2, on which it gives other neighbourhoods.

Queries and gallery form one pool of n = nq + ng items with the joint distance matrix
``[[q_q, q_g], [q_g.T, g_g]]``. Steps, with d the joint distance:

1. Normalise: subtract the smallest distance of the whole matrix, then divide each row by
   its largest value, so d lies in [0, 1]. For squared Euclidean distances the smallest is
   an item's distance to itself, 0, so d = squared Euclidean / row max, what the authors'
   code computes from Euclidean distances. Cosine distances ``-(q.g)`` of unit-norm features
   become ``(1 - cos) / max``, the same values. A row whose values are all equal stays 0.
2. N(p, k): p's k + 1 nearest items of the pool (p itself included), by ``torch.topk``
   (equal distances at the k-th place are broken arbitrarily).
   R(p, k) = {g in N(p, k) : p in N(g, k)}, the k-reciprocal neighbours.
3. R*(p) = R(p, k1) united with every R(g, round(k1/2)), g in R(p, k1), that shares at least
   2/3 of its members with R(p, k1). The authors' released code, whose numbers papers
   report, tests ``shared > (2./3) * size`` in floating point: ``expansion="released"``
   (the default here, in evaluation.trials and in TEST.RERANK_EXPANSION); with it this
   function agrees with that code (squared Euclidean inputs) to rounding. The paper writes
   ">=" (``expansion="paper"``), which accepts some sets the released rule rejects (size 3
   with 2 shared).
4. V_p[g] = exp(-d(p, g)) for g in R*(p), 0 elsewhere, normalised to sum 1 (Gaussian kernel).
5. Local query expansion: V_p <- mean of V_g over g in N(p, k2 - 1) (k2 nearest, p included).
6. Jaccard distance d_J(p, g) = 1 - sum_i min(V_p[i], V_g[i]) / sum_i max(V_p[i], V_g[i]),
   over all n pool items i.
7. Result: (1 - lambda) d_J + lambda d, query rows and gallery columns.

Steps 2, 3, 5 and the overlap sums of step 6 are the k-reciprocal core shared with the
clustering step of the unsupervised pipeline (evaluation.kreciprocal); the normalisation of
step 1, the kernel of step 4, the union of step 6 and step 7 are this function's own.

Memory. Apart from the three input matrices, the dense temporaries are blocks of
``chunk`` rows of the joint matrix (``chunk x n`` values, chunk chosen so that about
``4 x itemsize x chunk x n <= memory_mb``, itemsize 4 for float32 and 8 for float64) and the
Jaccard accumulation pairs (about 64 bytes each, at most ``memory_mb`` of them at a time). The
weights V are sparse: at most
n x (k1 + 1)(round(k1/2) + 2) entries, and k2 times that after query expansion, instead of
the n x n dense matrix of the authors' code.
"""
import numpy as np
import torch

from evaluation.kreciprocal import SparseRows, expanded_sets, overlap_blocks, query_expansion

DEFAULT_MEMORY_MB = 256


def _matrix(x, name, shape, device, dtype):
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if tuple(t.shape) != shape:
        raise ValueError("%s must have shape %s, got %s" % (name, shape, tuple(t.shape)))
    if not t.dtype.is_floating_point:
        raise ValueError("%s must be floating point, got dtype %s" % (name, t.dtype))
    t = t.to(device=device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise ValueError("%s contains NaN or infinite values" % name)
    return t


class _JointDistance:
    """Row blocks of the normalised joint distance matrix (step 1), built on demand."""

    def __init__(self, q_g, q_q, g_g):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.nq, self.ng = q_g.shape
        self.n = self.nq + self.ng
        self.shift = torch.min(torch.stack([q_g.min(), q_q.min(), g_g.min()]))
        row_max = torch.cat([torch.maximum(q_q.max(1).values, q_g.max(1).values),
                             torch.maximum(q_g.max(0).values, g_g.max(1).values)])
        span = row_max - self.shift
        self.span = torch.where(span > 0, span, torch.ones_like(span))

    def raw_rows(self, s, e):
        if e <= self.nq:
            return torch.cat([self.q_q[s:e], self.q_g[s:e]], 1)
        if s >= self.nq:
            a, b = s - self.nq, e - self.nq
            return torch.cat([self.q_g[:, a:b].T, self.g_g[a:b]], 1)
        return torch.cat([self.raw_rows(s, self.nq), self.raw_rows(self.nq, e)], 0)

    def rows(self, s, e):
        return (self.raw_rows(s, e) - self.shift) / self.span[s:e, None]


def _weights(joint, nbr, k1, step, expansion):
    """Sparse V (steps 2-4): exp(-d) over each expanded set, normalised to sum 1 per row."""
    n = joint.n
    rows, cols = expanded_sets(nbr, k1, expansion, step)
    starts = torch.searchsorted(rows, torch.arange(0, n + step, step, device=rows.device).clamp(max=n))
    vals = []
    for b, s in enumerate(range(0, n, step)):
        e = min(s + step, n)
        lo, hi = int(starts[b]), int(starts[b + 1])
        r, col = rows[lo:hi] - s, cols[lo:hi]
        w = torch.exp(-joint.rows(s, e)[r, col])
        vals.append(w / torch.zeros(e - s, dtype=w.dtype, device=w.device).index_add_(0, r, w)[r])
    return SparseRows(rows, cols, torch.cat(vals), n, n)


def _jaccard(v, nq, budget, itemsize):
    """d_J between query pool items (rows < nq) and gallery pool items (rows >= nq) (step 6)."""
    n = v.n_rows
    row_sum = torch.zeros(n, dtype=v.vals.dtype, device=v.vals.device).index_add_(0, v.rows, v.vals)
    q, g = v.rows < nq, v.rows >= nq
    queries = SparseRows(v.rows[q], v.cols[q], v.vals[q], nq, n)
    gallery = SparseRows(v.rows[g] - nq, v.cols[g], v.vals[g], n - nq, n)
    overlap = torch.empty(nq, n - nq, dtype=v.vals.dtype, device=v.vals.device)
    for s, e, _, block in overlap_blocks(queries, gallery, max(1, budget // 64), budget // itemsize):
        overlap[s:e] = block
    union = row_sum[:nq, None] + row_sum[None, nq:] - overlap
    return 1 - overlap / union.clamp(min=torch.finfo(v.vals.dtype).tiny)


def k_reciprocal_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, expansion="released",
                        memory_mb=DEFAULT_MEMORY_MB, dtype=torch.float32):
    """Re-ranked query-by-gallery distance [nq, ng] (`dtype`, on q_g's device).

    q_g [nq, ng], q_q [nq, nq], g_g [ng, ng]: squared Euclidean distances (numpy or torch;
    module docstring). k1, k2: neighbourhood sizes (clamped to the pool size); lambda_value:
    weight of the original distance; expansion: "released" (default) or "paper" rule of
    step 3; memory_mb: the bound of the module docstring; dtype: torch.float32 or
    torch.float64, the precision every step is computed in.
    """
    q_g_t = q_g.detach() if isinstance(q_g, torch.Tensor) else torch.from_numpy(np.asarray(q_g))
    if q_g_t.dim() != 2:
        raise ValueError("q_g must be 2-D [n_query, n_gallery], got shape %s" % (tuple(q_g_t.shape),))
    nq, ng = q_g_t.shape
    if nq == 0 or ng == 0:
        raise ValueError("q_g is empty (shape %s): nothing to re-rank" % (tuple(q_g_t.shape),))
    dev = q_g_t.device
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("dtype must be torch.float32 or torch.float64, got %r" % (dtype,))
    q_g = _matrix(q_g_t, "q_g", (nq, ng), dev, dtype)
    q_q = _matrix(q_q, "q_q", (nq, nq), dev, dtype)
    g_g = _matrix(g_g, "g_g", (ng, ng), dev, dtype)
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError("k1 and k2 must be >= 1, got k1=%r, k2=%r" % (k1, k2))
    if expansion not in ("paper", "released"):
        raise ValueError("expansion must be 'paper' or 'released', got %r" % (expansion,))
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError("lambda_value must lie in [0, 1], got %r" % (lambda_value,))
    joint = _JointDistance(q_g, q_q, g_g)
    n = joint.n
    k1 = min(int(k1), n - 1)
    k2 = min(int(k2), n)
    budget = int(memory_mb * (1 << 20))
    itemsize = torch.finfo(dtype).bits // 8
    step = max(1, budget // (4 * itemsize * n))

    width = max(k1 + 1, k2)
    nbr = torch.empty(n, width, dtype=torch.int64, device=dev)
    for s in range(0, n, step):
        e = min(s + step, n)
        nbr[s:e] = torch.topk(joint.rows(s, e), width, dim=1, largest=False, sorted=True).indices
    v = _weights(joint, nbr, k1, step, expansion)
    v = query_expansion(v, nbr, k2, max(1, budget // 40))
    jaccard = _jaccard(v, nq, budget, itemsize)
    original = (q_g - joint.shift) / joint.span[:nq, None]
    return (1 - float(lambda_value)) * jaccard + float(lambda_value) * original
