"""k-reciprocal neighbourhoods and their Jaccard overlap, on sparse rows (the shared core).

Two users build the same objects from a neighbour table: the test-time re-ranking
(evaluation.rerank, over the pool of queries and gallery items) and the k-reciprocal Jaccard
distance of the unsupervised clustering step (cluster.jaccard, over the training images of
one modality). They differ in how the table is searched, in the weight kernel and in the
final distance formula; this module holds only what is common.

Objects, for n items:

* ``nbr`` [n, W] int64: row i lists items by increasing distance to i, i itself first. The
  re-ranking searches W = k1 + 1 columns, the clustering step W = k1.
* R(i, k) = {j in nbr[i, :k+1] : i in nbr[j, :k+1]}, the k-reciprocal neighbours of i, in
  the order of nbr[i]. When W < k + 1 the slice has only the W available columns.
* R*(i), the expanded set: R(i, k1) united with every R(c, half_k(k1)), c in R(i, k1), that
  shares enough members with R(i, k1): more than 2/3 of its members, compared in floating
  point (``rule="released"``, the rule of the released re-ranking and clustering code), or
  at least 2/3 (``rule="paper"``: 3 * shared >= 2 * size). Its members come out sorted.
* Sparse matrices are :class:`SparseRows`: parallel ``rows``, ``cols`` (int64) and ``vals``
  tensors, sorted by row, then column, without duplicates.
* Query expansion: V_qe[i] = mean of the rows V[nbr[i, :k2]] (i itself included), summed in
  that order and then divided by the number of rows.
* The Jaccard overlap of two weight rows: m(i, j) = sum_k min(a[i, k], b[j, k]) over the
  columns both rows hold, accumulated for each pair in increasing column order.

Memory: every function works on blocks of rows whose temporaries are bounded by its
arguments; nothing is n x n except the [rows, n_b] overlap blocks handed to the caller.
"""
from typing import NamedTuple

import torch

RULES = ("released", "paper")


class SparseRows(NamedTuple):
    """A sparse [n_rows, n_cols] matrix: entries (rows[e], cols[e]) -> vals[e], sorted by row, then column."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    n_rows: int
    n_cols: int

    def to_dense(self):
        """[n_rows, n_cols] tensor, zero where there is no entry."""
        out = torch.zeros(self.n_rows, self.n_cols, dtype=self.vals.dtype, device=self.vals.device)
        out[self.rows, self.cols] = self.vals
        return out

    def row_starts(self):
        """[n_rows + 1] offsets of each row's entries (CSR indptr)."""
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def half_k(k1):
    """round(k1 / 2) with ties to even, as numpy's ``around`` and Python's ``round``: 30 -> 15, 5 -> 2."""
    return int(round(int(k1) / 2))


def reciprocal_mask(nbr, k, chunk):
    """[n, w] bool, w = min(k + 1, W): whether row i is among the first w neighbours of nbr[i, t]."""
    n = nbr.shape[0]
    w = min(int(k) + 1, nbr.shape[1])
    out = torch.empty(n, w, dtype=torch.bool, device=nbr.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        rows = torch.arange(s, e, device=nbr.device)
        back = nbr[nbr[s:e, :w], :w]
        out[s:e] = (back == rows[:, None, None]).any(-1)
    return out


def reciprocal_lists(nbr, k, chunk=4096):
    """R(i, k) for every row, as Python lists in the order of nbr[i]."""
    mask = reciprocal_mask(nbr, k, chunk)
    cand = nbr[:, :mask.shape[1]]
    return [cand[i][mask[i]].tolist() for i in range(nbr.shape[0])]


def expansion_chunk(width, memory_mb):
    """Rows per block of :func:`expanded_sets` for a table of `width` columns within `memory_mb`."""
    per_row = 64 * width * width + 64
    return max(1, int(memory_mb * (1 << 20)) // per_row)


def expanded_sets(nbr, k1, rule="released", chunk=1024):
    """The expanded sets R*(i) of every row as (rows, cols) int64 tensors, sorted by row, then column."""
    if rule not in RULES:
        raise ValueError("expansion rule must be one of %s, got %r" % (", ".join(RULES), rule))
    n, dev = nbr.shape[0], nbr.device
    in_k1 = reciprocal_mask(nbr, k1, chunk)
    in_half = reciprocal_mask(nbr, half_k(k1), chunk)
    w1, w2 = in_k1.shape[1], in_half.shape[1]
    rows_out, cols_out = [], []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        c = e - s
        cand, cand_in = nbr[s:e, :w1], in_k1[s:e]
        half = nbr[cand, :w2]
        half_in = in_half[cand] & cand_in[:, :, None]
        # members of R(c, half_k) that also belong to R(i, k1): a search in R(i, k1), sorted,
        # padded with n (no item)
        base_or_n = torch.where(cand_in, cand, n)
        base = torch.sort(base_or_n, dim=1).values
        flat = half.reshape(c, -1)
        found = base.gather(1, torch.searchsorted(base, flat).clamp_(max=w1 - 1))
        in_base = (found == flat).view_as(half)
        shared = (in_base & half_in).sum(-1)
        size = half_in.sum(-1)
        if rule == "paper":
            accept = cand_in & (3 * shared >= 2 * size)
        else:
            accept = cand_in & (shared.double() > (2.0 / 3) * size.double())
        grow = half_in & accept[:, :, None]
        # each row's members, padded with n, sorted; a member is kept where it first appears
        members = torch.sort(torch.cat([base_or_n, torch.where(grow, half, n).view(c, -1)], 1), dim=1).values
        first = torch.ones_like(members, dtype=torch.bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        keep = first & (members < n)
        rows_out.append(torch.nonzero(keep)[:, 0] + s)
        cols_out.append(members[keep])
    return torch.cat(rows_out), torch.cat(cols_out)


def query_expansion(v, nbr, k2, max_entries=1 << 22):
    """V_qe[i] = mean of v's rows nbr[i, :k2] (sum in that order, then division), as SparseRows.

    k2 <= 1 returns v unchanged. Each output entry receives at most one addition per
    neighbour rank, so the sum is sequential and deterministic on any device.
    `max_entries` bounds the expanded entries held at once (about 40 bytes each).
    """
    width = min(int(k2), nbr.shape[1])
    if int(k2) <= 1:
        return v
    n, dev = v.n_rows, v.vals.device
    starts = v.row_starts()
    counts = starts[1:] - starts[:-1]
    per_row = counts[nbr[:, :width]].sum(1)
    rows_out, cols_out, vals_out = [], [], []
    s = 0
    while s < n:
        cum = torch.cumsum(per_row[s:], 0)
        e = s + max(1, int((cum <= max_entries).sum()))
        dst_parts, col_parts, val_parts, sizes = [], [], [], []
        for t in range(width):
            src = nbr[s:e, t]
            size = counts[src]
            entry = torch.repeat_interleave(torch.arange(e - s, device=dev), size)
            offset = torch.arange(len(entry), device=dev) - (torch.cumsum(size, 0) - size)[entry]
            pos = starts[src][entry] + offset
            dst_parts.append(entry + s)
            col_parts.append(v.cols[pos])
            val_parts.append(v.vals[pos])
            sizes.append(len(entry))
        key, inverse = torch.unique(torch.cat(dst_parts) * v.n_cols + torch.cat(col_parts), sorted=True,
                                    return_inverse=True)
        acc = torch.zeros(len(key), dtype=v.vals.dtype, device=dev)
        for part, vals in zip(torch.split(inverse, sizes), val_parts):
            acc.index_add_(0, part, vals)
        rows_out.append(torch.div(key, v.n_cols, rounding_mode="floor"))
        cols_out.append(key % v.n_cols)
        vals_out.append(acc / width)
        s = e
    return SparseRows(torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), n, v.n_cols)


def overlap_blocks(a, b, max_pairs, max_block, upper=False):
    """Yield (start, stop, first, block [stop - start, b.n_rows - first]):
    block[i, j] = m(start + i, first + j).

    m(i, j) = sum_k min(a[i, k], b[j, k]) over the columns k held by both row i of `a` and
    row j of `b` (SparseRows with the same columns), zero where they share none. Without
    ``upper``, first = 0. With ``upper`` (`a` and `b` the same matrix, so m is symmetric) only
    the pairs j >= i are summed and a block starts at column first = start. Blocks hold at
    least one row, and otherwise at most `max_pairs` (row entry, column entry) pairs (about
    64 bytes each) and `max_block` block elements. On the CPU every pair's sum runs in
    increasing column order.
    """
    dev = a.vals.device
    order = torch.sort(b.cols * b.n_rows + b.rows).indices
    b_rows, b_vals = b.rows[order], b.vals[order]
    col_count = torch.bincount(b.cols, minlength=a.n_cols)
    col_end = torch.cumsum(col_count, 0)
    if upper:
        # entry (i, k) itself is b's first entry in column k at a row >= i
        first = torch.empty_like(order)
        first[order] = torch.arange(len(order), device=dev)
    else:
        first = (col_end - col_count).index_select(0, a.cols)
    pairs = col_end.index_select(0, a.cols) - first
    pairs_per_row = torch.zeros(a.n_rows, dtype=torch.int64, device=dev).index_add_(0, a.rows, pairs)
    entry_end = a.row_starts()[1:]
    s = 0
    while s < a.n_rows:
        col0 = s if upper else 0
        width = b.n_rows - col0
        cum = torch.cumsum(pairs_per_row[s:s + max(1, int(max_block) // max(1, width))], 0)
        e = s + max(1, int((cum <= max_pairs).sum()))
        lo = int(entry_end[s - 1]) if s else 0
        hi = int(entry_end[e - 1])
        size = pairs[lo:hi]
        total = int(cum[e - s - 1])
        entry = torch.repeat_interleave(size, output_size=total)
        # pair p of entry t reads b's entry first[t] + (p - the first pair of t)
        pos = (first[lo:hi] - (torch.cumsum(size, 0) - size)).index_select(0, entry)
        pos += torch.arange(total, device=dev)
        target = ((a.rows[lo:hi] - s) * width - col0).index_select(0, entry)
        target += b_rows.index_select(0, pos)
        contrib = torch.minimum(a.vals[lo:hi].index_select(0, entry), b_vals.index_select(0, pos))
        del entry, pos
        block = torch.zeros(e - s, width, dtype=a.vals.dtype, device=dev)
        block.view(-1).index_add_(0, target, contrib)
        del target, contrib
        yield s, e, col0, block
        s = e
