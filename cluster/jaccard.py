"""The k-reciprocal Jaccard distance between the training images of one modality (sparse).

``jaccard_distance(x [N, D], k1=30, k2=6)`` -> :class:`SparseJaccard`, the [N, N] distance
of the reference clustering code, with its quirks:

1. ``nbr`` = the k1 nearest rows of each row, itself first (cluster.knn): a search width
   of k1, so R(i, k1) is taken from k1 columns, not k1 + 1.
2. R(i, k1), R(i, half_k(k1)) (ties of k1 / 2 round to even: 30 -> 15, 5 -> 2) and the
   expanded sets R*(i) with the released "more than 2/3" rule (evaluation.kreciprocal).
3. V[i, j] = softmax over j in R*(i) of -(2 - 2 x_i.x_j) (float32): the rows of x must have
   unit norm, as 2 - 2 x_i.x_j stands for the squared distance.
4. Query expansion: V[i] <- mean of V over the rows nbr[i, :k2], i itself included.
5. m(i, j) = sum_k min(V[i, k], V[j, k]) over the columns both rows hold, summed in float32
   (on the CPU in increasing k, as the reference); d(i, j) = 1 - m / (2 - m), negatives set
   to 0.

Pairs whose rows share no column have d = 1 exactly and are not stored: a SparseJaccard
holds, per row, the pairs with a shared column (the diagonal always, d ~ 1e-7 as V rows sum
to 1), optionally only those with d <= ``max_distance``. V is not symmetric, but d is, exactly:
m(i, j) and m(j, i) add the same minima in the same order.

Memory: V has a few dozen entries per row (R*(i) before, the union of k2 such rows after
query expansion); the overlap sums run over blocks of rows (evaluation.kreciprocal
overlap_blocks), so no N x N array is ever made unless :meth:`SparseJaccard.to_dense` is
called. ``memory_mb`` bounds each step's temporaries (the stored result comes on top).
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse
import torch

from cluster.knn import DEFAULT_MEMORY_MB, nearest_neighbours
from evaluation.kreciprocal import SparseRows, expanded_sets, expansion_chunk, overlap_blocks, query_expansion

# how far a row norm may be from 1 before the 2 - 2 x.y distance is meaningless
NORM_TOLERANCE = 1e-3


@dataclass
class SparseJaccard:
    """Sparse [n, n] Jaccard distance in CSR form (CPU): row i's stored pairs are
    ``indices[indptr[i]:indptr[i + 1]]`` (ascending) with distances ``values`` (float32).
    The diagonal is always stored. Absent pairs have distance 1.0 when ``max_distance`` is
    None; otherwise they are beyond ``max_distance``."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n: int
    max_distance: Optional[float] = None

    def row_ids(self):
        """[nnz] row of every stored pair."""
        return torch.repeat_interleave(torch.arange(self.n), self.indptr[1:] - self.indptr[:-1])

    def to_dense(self):
        """[n, n] float32 tensor, 1.0 where no pair is stored (only for a complete matrix)."""
        if self.max_distance is not None:
            raise ValueError("this Jaccard matrix keeps only the pairs within %g; the dense matrix needs all of them "
                             "(max_distance=None)" % self.max_distance)
        out = torch.ones(self.n, self.n, dtype=torch.float32)
        out[self.row_ids(), self.indices] = self.values
        return out

    def radius_graph(self, eps):
        """scipy CSR [n, n] float32 of the pairs with d <= eps, plus every stored diagonal pair.

        The comparison is made in float32, as on the dense float32 matrix. Diagonal pairs are
        kept whatever their distance, so that a consumer that adds the missing diagonal (sklearn's
        DBSCAN does) sees the true self-distance.
        """
        if self.max_distance is not None and eps > self.max_distance:
            raise ValueError("radius %g exceeds the %g this Jaccard matrix was limited to" % (eps, self.max_distance))
        rows = self.row_ids()
        keep = (self.values <= np.float32(eps)) | (self.indices == rows)
        counts = torch.bincount(rows[keep], minlength=self.n)
        indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return scipy.sparse.csr_matrix((self.values[keep].numpy(), self.indices[keep].numpy(), indptr.numpy()),
                                       shape=(self.n, self.n))


def _unit_rows(features):
    x = torch.as_tensor(features)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("features must be a non-empty [N, D] matrix, got shape %s" % (tuple(x.shape),))
    if not x.dtype.is_floating_point:
        raise ValueError("features must be floating point, got %s" % x.dtype)
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    norms = x.norm(dim=1)
    worst = int(torch.argmax((norms - 1).abs()))
    if abs(float(norms[worst]) - 1) > NORM_TOLERANCE:
        raise ValueError("the Jaccard distance needs L2-normalised feature rows; row %d has norm %.6g"
                         % (worst, float(norms[worst])))
    return x


def _inner_products(x, rows, cols):
    """x[rows[e]] . x[cols[e]] for sorted (rows, cols), without gathering the rows."""
    n = x.shape[0]
    counts = torch.bincount(rows, minlength=n)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    with warnings.catch_warnings():
        # sparse CSR support is flagged as beta; the sampled product is all that is used
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(cols), dtype=x.dtype, device=x.device),
                                          (n, n))
        return torch.sparse.sampled_addmm(pattern, x, x.T, beta=0.0).values()


def kreciprocal_weights(features, nbr, k1, memory_mb=DEFAULT_MEMORY_MB):
    """Sparse V [N, N] before query expansion (steps 2 and 3 of the module docstring)."""
    x = features
    rows, cols = expanded_sets(nbr, k1, "released", expansion_chunk(min(int(k1) + 1, nbr.shape[1]), memory_mb))
    logits = -(2 - 2 * _inner_products(x, rows, cols))
    n = x.shape[0]
    row_max = torch.full((n,), float("-inf"), device=x.device).scatter_reduce_(0, rows, logits, "amax")
    e = torch.exp(logits - row_max[rows])
    return SparseRows(rows, cols, e / torch.zeros(n, device=x.device).index_add_(0, rows, e)[rows], n, n)


def jaccard_from_weights(v, max_distance=None, memory_mb=DEFAULT_MEMORY_MB):
    """The SparseJaccard of weights v (step 5 of the module docstring).

    m(i, j) is symmetric (the same minima summed in the same order), so only the pairs
    j >= i are computed and then mirrored.
    """
    budget = int(memory_mb * (1 << 20))
    n = v.n_rows
    rows, cols, values = [], [], []
    for s, _, col0, m in overlap_blocks(v, v, max(1, budget // 64), max(1, budget // 16), upper=True):
        width = m.shape[1]
        flat = torch.nonzero(m.view(-1)).squeeze(1)
        m = m.view(-1).index_select(0, flat)
        d = (1 - m / (2 - m)).clamp_(min=0)
        r, c = torch.div(flat, width, rounding_mode="floor") + s, flat % width + col0
        if max_distance is not None:
            keep = (d <= torch.tensor(float(max_distance), dtype=d.dtype, device=d.device)) | (r == c)
            r, c, d = r[keep], c[keep], d[keep]
        rows.append(r.cpu())
        cols.append(c.cpu())
        values.append(d.cpu())
    rows, cols, values = torch.cat(rows), torch.cat(cols), torch.cat(values)
    below = rows != cols
    key = torch.cat([rows * n + cols, cols[below] * n + rows[below]])
    key, order = torch.sort(key)
    values = torch.cat([values, values[below]])[order]
    counts = torch.bincount(torch.div(key, n, rounding_mode="floor"), minlength=n)
    indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return SparseJaccard(indptr, key % n, values, n, None if max_distance is None else float(max_distance))


def jaccard_distance(features, k1=30, k2=6, knn_backend="torch", device=None, memory_mb=DEFAULT_MEMORY_MB,
                     max_distance=None):
    """SparseJaccard [N, N] of the unit-norm rows of `features` [N, D] (module docstring).

    knn_backend: "torch" or "faiss" (cluster.knn); device: where to compute (default: the
    features'); memory_mb: the bound on each step's temporaries; max_distance: keep only the
    pairs with d <= max_distance, and the diagonal (None: every pair with a shared column).
    """
    x = _unit_rows(features)
    device = torch.device(device) if device is not None else x.device
    x = x.to(device)
    with torch.no_grad():
        nbr = nearest_neighbours(x, k1, backend=knn_backend, device=device, memory_mb=memory_mb).to(device)
        v = kreciprocal_weights(x, nbr, k1, memory_mb)
        v = query_expansion(v, nbr, k2, max(1, int(memory_mb * (1 << 20)) // 40))
        return jaccard_from_weights(v, max_distance, memory_mb)
