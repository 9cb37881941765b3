"""Dense numpy reference of the clustering step: k-reciprocal Jaccard distance and DBSCAN.

Written from the description of the reference clustering code (``compute_jaccard_distance``
with an exact L2 index, then sklearn's DBSCAN on the dense matrix), one image at a time
with dense [N, N] float32 matrices, the way that code works:

1. ``initial_rank`` [N, k1]: each row's k1 nearest rows (itself included) by the squared
   distance |x|^2 + |y|^2 - 2 x.y computed in float32 as an L2 index does, equal distances
   ordered by index;
2. R(i, k) = {j in initial_rank[i, :k+1] : i in initial_rank[j, :k+1]} (for k = k1 only k1
   columns exist); k1_half = numpy's round(k1 / 2), ties to even;
3. the expansion: R(c, k1_half), c in R(i, k1), is appended when more than 2/3 of its
   (unique) members are in R(i, k1); then np.unique;
4. V[i, S] = softmax over S of -(2 - 2 x_i.x_S) in float32 (max subtracted first);
5. query expansion (k2 != 1): V_qe[i] = np.mean(V[initial_rank[i, :k2]], axis=0);
6. invIndex[k] = rows j with V[j, k] != 0; for each row i, over its nonzero columns in
   increasing order, m[invIndex[k]] += min(V[i, k], V[invIndex[k], k]) in float32;
   jaccard[i] = 1 - m / (2 - m); negatives set to 0.

This module is the independent expectation cluster.jaccard and cluster.dbscan are tested
and benchmarked against; it is deliberately simple and needs about 3 x 4 N^2 bytes.
"""
import numpy as np
from sklearn.cluster import DBSCAN

ROW_BLOCK = 1024


def reference_initial_rank(x, k1):
    """[N, k1] int64 nearest rows of x (float32 [N, D]), exact search, ties by index."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    sq = (x * x).sum(1)
    out = np.empty((n, k1), dtype=np.int64)
    for s in range(0, n, ROW_BLOCK):
        d = sq[s:s + ROW_BLOCK, None] + sq[None, :] - 2 * (x[s:s + ROW_BLOCK] @ x.T)
        # the k1 smallest, ties at the k1-th value included, then ordered by (distance, index)
        kth = np.partition(d, k1 - 1, axis=1)[:, k1 - 1]
        for r in range(d.shape[0]):
            cand = np.flatnonzero(d[r] <= kth[r])
            out[s + r] = cand[np.lexsort((cand, d[r, cand]))][:k1]
    return out


def reference_reciprocal(initial_rank, i, k):
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]


def reference_jaccard(x, k1=30, k2=6, initial_rank=None, return_intermediates=False):
    """Dense [N, N] float32 Jaccard distance of the unit-norm float32 rows of x (module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if initial_rank is None:
        initial_rank = reference_initial_rank(x, k1)
    k1_half = int(np.around(k1 / 2))
    nn_k1 = [reference_reciprocal(initial_rank, i, k1) for i in range(n)]
    nn_k1_half = [reference_reciprocal(initial_rank, i, k1_half) for i in range(n)]

    V = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        base = nn_k1[i]
        expansion = base
        for candidate in base:
            theirs = nn_k1_half[candidate]
            if len(np.intersect1d(theirs, base)) > 2 / 3 * len(theirs):
                expansion = np.append(expansion, theirs)
        expansion = np.unique(expansion)
        logits = -(2 - 2 * (x[expansion] @ x[i]))
        e = np.exp(logits - logits.max())
        V[i, expansion] = e / e.sum()
    intermediates = dict(initial_rank=initial_rank, nn_k1=[r.tolist() for r in nn_k1],
                         nn_k1_half=[r.tolist() for r in nn_k1_half], V_before_query_expansion=V.copy())
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i] = np.mean(V[initial_rank[i, :k2]], axis=0)
        V = V_qe
        del V_qe
    intermediates["V_after_query_expansion"] = V

    inv_index = [np.where(V[:, k] != 0)[0] for k in range(n)]
    jaccard = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        m = np.zeros(n, dtype=np.float32)
        for k in np.where(V[i] != 0)[0]:
            rows = inv_index[k]
            m[rows] = m[rows] + np.minimum(V[i, k], V[rows, k])
        jaccard[i] = 1 - m / (2 - m)
    jaccard[jaccard < 0] = 0.0
    if return_intermediates:
        return jaccard, intermediates
    return jaccard


def reference_dbscan(jaccard, eps, min_samples=4):
    """sklearn DBSCAN labels (int64, -1 = outlier) on the dense precomputed matrix."""
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(jaccard).astype(np.int64)
