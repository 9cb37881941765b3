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

Memory. Apart from the three input matrices, the dense temporaries are blocks of
``chunk`` rows of the joint matrix (``chunk x n`` values, chunk chosen so that about
``4 x itemsize x chunk x n <= memory_mb``, itemsize 4 for float32 and 8 for float64) and the
Jaccard accumulation pairs (at most ``memory_mb / (36 + itemsize) bytes`` at a time). The
weights V are sparse: at most
n x (k1 + 1)(round(k1/2) + 2) entries, and k2 times that after query expansion, instead of
the n x n dense matrix of the authors' code.
"""
import numpy as np
import torch

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


def _reciprocal(nbr, k, step):
    """Mask [n, k+1] over nbr[:, :k+1]: whether row p is also among its neighbour's k+1."""
    n = nbr.shape[0]
    out = torch.empty(n, k + 1, dtype=torch.bool, device=nbr.device)
    for s in range(0, n, step):
        rows = torch.arange(s, min(s + step, n), device=nbr.device)
        back = nbr[nbr[rows, :k + 1], :k + 1]
        out[rows] = (back == rows[:, None, None]).any(-1)
    return out


def _coalesce(rows, cols, vals, n):
    """Sum duplicate (row, col) entries; returns them sorted by row, then column."""
    key, inverse = torch.unique(rows * n + cols, sorted=True, return_inverse=True)
    summed = torch.zeros(len(key), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals)
    return torch.div(key, n, rounding_mode="floor"), key % n, summed


def _expanded_weights(joint, nbr, k1, step, expansion):
    """Sparse V (steps 2-4): (row, col, weight) entries, sorted by row, then column."""
    n, dev = joint.n, nbr.device
    kh = int(round(k1 / 2))
    recip = _reciprocal(nbr, k1, step)
    recip_half = _reciprocal(nbr, kh, step)
    rows_out, cols_out, vals_out = [], [], []
    for s in range(0, n, step):
        e = min(s + step, n)
        c = e - s
        local = torch.arange(c, device=dev)
        cand = nbr[s:e, :k1 + 1]
        in_r = recip[s:e]
        member = torch.zeros(c, n, dtype=torch.bool, device=dev)
        member[local[:, None].expand_as(cand)[in_r], cand[in_r]] = True
        half = nbr[cand, :kh + 1]
        half_in = recip_half[cand] & in_r[:, :, None]
        shared = (member.gather(1, half.reshape(c, -1)).view_as(half) & half_in).sum(-1)
        size = half_in.sum(-1)
        if expansion == "paper":
            accept = in_r & (3 * shared >= 2 * size)
        else:
            accept = in_r & (shared.double() > (2.0 / 3) * size.double())
        grow = half_in & accept[:, :, None]
        member[local[:, None, None].expand_as(half)[grow], half[grow]] = True
        r, col = member.nonzero().unbind(1)
        w = torch.exp(-joint.rows(s, e)[r, col])
        w = w / torch.zeros(c, dtype=w.dtype, device=dev).index_add_(0, r, w)[r]
        rows_out.append(r + s)
        cols_out.append(col)
        vals_out.append(w)
    return torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out)


def _query_expansion(rows, cols, vals, nbr, k2, n):
    """V_p <- mean of V_g over p's k2 nearest (step 5), for every pool item p."""
    if k2 <= 1:
        return rows, cols, vals
    counts = torch.bincount(rows, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    src = nbr[:, :k2].reshape(-1)
    dst = torch.arange(n, device=nbr.device).repeat_interleave(k2)
    size = counts[src]
    entry = torch.repeat_interleave(torch.arange(len(src), device=nbr.device), size)
    pos = starts[src][entry] + torch.arange(len(entry), device=nbr.device) - (torch.cumsum(size, 0) - size)[entry]
    return _coalesce(dst[entry], cols[pos], vals[pos] / k2, n)


def _jaccard(rows, cols, vals, nq, n, pair_budget):
    """d_J between query pool items (rows < nq) and gallery pool items (rows >= nq) (step 6)."""
    dev = vals.device
    ng = n - nq
    row_sum = torch.zeros(n, dtype=vals.dtype, device=dev).index_add_(0, rows, vals)
    gal = rows >= nq
    g_rows, g_cols, g_vals = rows[gal] - nq, cols[gal], vals[gal]
    order = torch.sort(g_cols, stable=True).indices
    g_rows, g_vals = g_rows[order], g_vals[order]
    col_count = torch.bincount(g_cols, minlength=n)
    col_start = torch.cumsum(col_count, 0) - col_count

    qmask = rows < nq
    q_rows, q_cols, q_vals = rows[qmask], cols[qmask], vals[qmask]
    pairs = col_count[q_cols]
    pairs_per_row = torch.zeros(nq, dtype=torch.int64, device=dev).index_add_(0, q_rows, pairs)
    entry_start = torch.cumsum(torch.bincount(q_rows, minlength=nq), 0)
    overlap = torch.zeros(nq, ng, dtype=vals.dtype, device=dev)
    s = 0
    while s < nq:
        # The largest block of query rows whose pairs fit the budget (at least one row).
        cum = torch.cumsum(pairs_per_row[s:], 0)
        e = s + max(1, int((cum <= pair_budget).sum()))
        a = int(entry_start[s - 1]) if s else 0
        b = int(entry_start[e - 1])
        size = pairs[a:b]
        entry = torch.repeat_interleave(torch.arange(a, b, device=dev), size)
        offset = torch.arange(len(entry), device=dev) - (torch.cumsum(size, 0) - size)[entry - a]
        pos = col_start[q_cols[entry]] + offset
        contrib = torch.minimum(q_vals[entry], g_vals[pos])
        overlap.view(-1).index_add_(0, q_rows[entry] * ng + g_rows[pos], contrib)
        s = e
    union = row_sum[:nq, None] + row_sum[None, nq:] - overlap
    return 1 - overlap / union.clamp(min=torch.finfo(vals.dtype).tiny)


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
    rows, cols, vals = _expanded_weights(joint, nbr, k1, step, expansion)
    rows, cols, vals = _query_expansion(rows, cols, vals, nbr, k2, n)
    jaccard = _jaccard(rows, cols, vals, nq, n, max(1, budget // (36 + itemsize)))
    original = (q_g - joint.shift) / joint.span[:nq, None]
    return (1 - float(lambda_value)) * jaccard + float(lambda_value) * original
