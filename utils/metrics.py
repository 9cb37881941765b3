"""Retrieval metrics of the VI-ReID protocols: CMC, mAP and mINP (spec section 3.2).

``evaluate(distmat [nq, ng], q_pids [nq], g_pids [ng], q_camids [nq], g_camids [ng], protocol)``
gives the numbers of the standard per-query code (eval_sysu / eval_llcm / eval_regdb, and
the Market ``eval_func``) without a per-query Python loop and without sorting whole rows.

Protocols (removal rule applied to every query's ranked gallery, then the metrics):

=========  ==================================================  ==============================
protocol   gallery items removed for a query                   ``cmc`` returned
=========  ==================================================  ==============================
sysu       cam-3 query: every cam-2 item (any identity)        distinct-identity CMC
llcm       same identity and same camera                       distinct-identity CMC
regdb      nothing                                             standard CMC
market     same identity and same camera                       standard CMC
=========  ==================================================  ==============================

Standard CMC: 1 from the rank of the first kept true match on. Distinct-identity CMC (the
released code's "author's protocol"): the kept ranked list keeps only the first item of
each identity before ranks are counted. mAP (mean precision at the hits) and mINP (hits /
rank of the last hit) always use the full kept list. All three average over *valid*
queries, the ones with at least one kept true match.

How it works. Only the positions of the R kept true matches of a query matter: the rank of
the k-th match is k + 1 + (number of kept items of other identities ranked before it). Per
chunk of query rows the matches' distances are gathered and sorted (R is small), the kept
items of other identities at a distance <= the last match's are selected (a few
comparisons per distance), and each selected item's slot among the sorted matches is read
from a per-row lookup table of distance bins; items whose bin also holds a match are
settled by direct comparison.
Counting the items per slot (bincount) gives every match's rank; the identities of the
items before the first match give its distinct-identity rank. Cost: one comparison per
distance plus work proportional to the number of items ranked before each query's last
true match; no row is sorted. The work is torch operations on the distance matrix's
device, so CUDA inputs are evaluated on the GPU; on CPU the dense comparison and the index
extraction use numpy, several times faster there than torch.

Memory: query rows are processed in chunks of ``chunk_rows`` rows, by default chosen so
that ``chunk_rows x n_gallery x 128 bytes <= memory_mb`` (256 MiB); 128 bytes per distance
bounds the worst case, where every item of a row ranks before its last true match.

Ties (equal distances): ranked lists are ordered by (distance, gallery index), i.e. a
stable sort. The standard code uses numpy's default (unstable) quicksort, so results are
identical to it whenever no kept item of a row shares its distance with a true match of
that row, and may differ otherwise.

Cases the standard code mishandles, handled here:

* queries without a kept true match are skipped and counted (``num_valid_queries``);
  when no query is valid a ValueError is raised (the standard code asserts);
* the CMC always has ``max_rank`` entries. A query whose first (distinct-identity) hit is at
  rank r contributes 1 to every entry from r on, also past the end of a short gallery or of
  a short list of distinct identities, so the curve saturates instead of the standard code's
  ragged-array crash (distinct CMC) or length change (``n_gallery < max_rank``).
"""
import numpy as np
import torch

PROTOCOLS = ("sysu", "llcm", "regdb", "market")
DISTINCT_CMC_PROTOCOLS = ("sysu", "llcm")

DEFAULT_MEMORY_MB = 256
# Peak temporary bytes per distance of a chunk in the worst case (every item of a row
# ranked before its last true match): a mask byte and about ten 8-byte values per item,
# plus the per-row match and bin tables (at most n_gallery / 4 bins, see _slot_counts).
_BYTES_PER_DISTANCE = 128
# Distance bins per true match in the lookup table: more bins, fewer direct comparisons.
_BINS_PER_MATCH = 8


def _to_tensor(x, device=None):
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    return t if device is None else t.to(device)


def _as_labels(x, name, length, device):
    t = _to_tensor(x, device)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError("%s must be a 1-D array of length %d, got shape %s" % (name, length, tuple(t.shape)))
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError("%s must hold integers, got dtype %s" % (name, t.dtype))
    return t.to(torch.int64)


class _Gallery:
    """Gallery labels in the form the chunks need (all on the distance matrix's device).

    pid [ng]: identity as an index 0..P-1; cam [ng]; members [ng]: gallery indices sorted by
    (identity index, gallery index); start [P] / count [P]: each identity's run in members.
    """

    def __init__(self, g_pids, g_camids):
        self.ids, self.pid = torch.unique(g_pids, return_inverse=True)
        self.cam = g_camids
        self.members = torch.sort(self.pid, stable=True).indices
        self.count = torch.bincount(self.pid, minlength=len(self.ids))
        self.start = torch.cumsum(self.count, 0) - self.count

    def index_of(self, pids):
        """Identity index of each pid in `pids`, -1 where the gallery lacks it."""
        pos = torch.searchsorted(self.ids, pids).clamp(max=len(self.ids) - 1)
        return torch.where(self.ids[pos] == pids, pos, torch.full_like(pos, -1))


def _removed(protocol, q_cam, g_cam, same_identity):
    """Removal rule of spec 3.2 for gallery items of the query's identity (same_identity
    True) or of other identities (False), broadcasting; None when nothing is removed."""
    if protocol == "sysu":
        return (q_cam == 3) & (g_cam == 2)
    if same_identity and protocol in ("llcm", "market"):
        return g_cam == q_cam
    return None


def _take(table, index):
    """table.view(-1)[index] for a 1-D index."""
    return table.reshape(-1).index_select(0, index)


def _flat_nonzero(mask):
    """Flat indices of the non-zero entries of a contiguous tensor, ascending."""
    if mask.device.type == "cpu":
        # numpy's flatnonzero is several times faster than torch's CPU nonzero.
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


def _rank_movers(D, last, qidx, qcam, gal, protocol):
    """The items that can move a true match's rank: kept, of another identity, at a distance
    <= their row's last kept match. Returns their (flat index in D, row, column), ascending."""
    arrays = (D, last, gal.pid, qidx, gal.cam, qcam)
    on_cpu = D.device.type == "cpu"
    # numpy's dense comparisons are several times faster than torch's on CPU.
    dist, last, g_pid, q_pid, g_cam, q_cam = (a.numpy() for a in arrays) if on_cpu else arrays
    mask = dist <= last
    mask &= g_pid[None, :] != q_pid[:, None]
    removed = _removed(protocol, q_cam[:, None], g_cam[None, :], same_identity=False)
    if removed is not None:
        mask &= ~removed
    flat = _flat_nonzero(torch.from_numpy(mask) if on_cpu else mask)
    r = torch.div(flat, D.shape[1], rounding_mode="floor")
    return flat, r, flat - r * D.shape[1]


def _sorted_matches(D, qidx, qcam, gal, protocol):
    """The kept true matches of each row, ordered by (distance, gallery index).

    Returns (dist [c, m], col [c, m], R [c]): slots >= R are padding with distance +inf and
    column n_gallery, so they never precede an item.
    """
    c, n = D.shape
    count = torch.where(qidx >= 0, gal.count[qidx.clamp(min=0)], torch.zeros_like(qidx))
    m = max(int(count.max()), 1) if c else 1
    slot = torch.arange(m, device=D.device)
    pos = (gal.start[qidx.clamp(min=0)][:, None] + slot).clamp(max=n - 1)
    col = gal.members[pos]
    kept = slot < count[:, None]
    removed = _removed(protocol, qcam[:, None], gal.cam[col], same_identity=True)
    if removed is not None:
        kept &= ~removed
    col = torch.sort(torch.where(kept, col, torch.full_like(col, n)), dim=1).values
    dist = D.gather(1, col.clamp(max=n - 1)).masked_fill(col == n, float("inf"))
    dist, order = torch.sort(dist, dim=1, stable=True)
    return dist, col.gather(1, order), kept.sum(1)


def _slot_counts(v, r, j, dist, col, R, n_gallery, budget_bytes):
    """Count items by slot among their row's sorted matches.

    Items: distance v, row r, column j [K]. An item's slot is the number of kept matches of
    its row that precede it. Returns (counts [c, m+1], indices of the items in slot 0, i.e.
    ranked before the row's first match).

    A lookup table per row over equal distance bins between the row's first and last match
    gives each item the number of matches in lower bins. The bin index is a monotone
    function of the distance (IEEE subtract, multiply, add and truncation, the same
    operations for items and matches), so that number is the slot unless the item's bin also
    holds matches; those few items are compared, by (distance, column), with the matches of
    their bin only.
    """
    c, m = dist.shape
    dev = dist.device
    bins = max(1, min(_BINS_PER_MATCH * m, n_gallery // 4))
    width = bins + 2
    valid = torch.arange(m, device=dev) < R[:, None]
    lo = dist[:, 0]
    hi = dist.gather(1, (R - 1).clamp(min=0)[:, None]).squeeze(1)
    scale = bins / (hi - lo)
    # Rows without a usable positive finite scale (no match, infinite distances, a span that
    # overflows) are treated as one bin holding all their matches.
    finite = (R > 0) & torch.isfinite(lo) & torch.isfinite(hi) & ((hi == lo) | (torch.isfinite(scale) & (scale > 0)))
    scale = torch.where(finite & (hi > lo), scale, torch.ones_like(scale))
    lo = torch.where(finite, lo, torch.zeros_like(lo))

    def bin_of(x, rows):
        u = (x - _take(lo, rows)).mul_(_take(scale, rows)).add_(1).clamp_(0, bins + 1)
        return u.to(torch.int64)

    match_rows = torch.arange(c, device=dev)[:, None].expand(c, m)[valid]
    match_key = match_rows * width + bin_of(dist[valid], match_rows)
    per_bin = torch.bincount(match_key, minlength=c * width).view(c, width)
    per_bin = torch.where(finite[:, None], per_bin, R[:, None])
    before_bin = torch.where(finite[:, None], torch.cumsum(per_bin, 1) - per_bin, torch.zeros_like(per_bin))

    key = bin_of(v, r).add_(r * width)
    slot_key = _take(torch.arange(c, device=dev)[:, None] * (m + 1) + before_bin, key)
    first = [_flat_nonzero(_take((before_bin == 0) & (per_bin == 0), key))]
    in_bin = _take(per_bin, key)
    unsure = _flat_nonzero(in_bin)
    if len(unsure):
        in_bin = _take(in_bin, unsure)
        w = int(in_bin.max())
        slot_in_bin = torch.arange(w, device=dev)
        step = max(1, budget_bytes // (40 * w))
        for s in range(0, len(unsure), step):
            u, n_u = unsure[s:s + step], in_bin[s:s + step]
            ru = _take(r, u)
            base = _take(slot_key, u) - ru * (m + 1)
            k = ru[:, None] * m + (base[:, None] + slot_in_bin).clamp_(max=m - 1)
            t, tc = _take(dist, k.view(-1)).view_as(k), _take(col, k.view(-1)).view_as(k)
            x, xc = _take(v, u)[:, None], _take(j, u)[:, None]
            before = (slot_in_bin < n_u[:, None]) & ((t < x) | ((t == x) & (tc < xc)))
            slot = base + before.sum(1)
            slot_key[u] = ru * (m + 1) + slot
            first.append(u[slot == 0])
    counts = torch.bincount(slot_key, minlength=c * (m + 1)).view(c, m + 1)
    return counts, torch.cat(first)


def _evaluate_chunk(D, qidx, qcam, gal, protocol, budget_bytes):
    """Per-row valid flag, AP, INP, first-hit rank and distinct-identity rank of one chunk."""
    c, n = D.shape
    dev = D.device
    dist, col, R = _sorted_matches(D, qidx, qcam, gal, protocol)
    m = dist.shape[1]
    last = dist.gather(1, (R - 1).clamp(min=0)[:, None])
    # NaN never compares true, so rows without a kept match select nothing.
    last = last.masked_fill((R == 0)[:, None], float("nan"))

    flat, r, j = _rank_movers(D, last, qidx, qcam, gal, protocol)
    counts, first = _slot_counts(_take(D, flat), r, j, dist, col, R, n, budget_bytes)

    k = torch.arange(m, device=dev)
    rank = k + 1 + torch.cumsum(counts[:, :m], 1)
    Rf = R.clamp(min=1).to(torch.float64)
    precision = torch.where(k < R[:, None], (k + 1).to(torch.float64) / rank,
                            torch.zeros((), dtype=torch.float64, device=dev))
    ap = precision.sum(1) / Rf
    inp = Rf / rank.gather(1, (R - 1).clamp(min=0)[:, None]).squeeze(1)

    n_ids = len(gal.ids)
    seen = torch.zeros(c * n_ids, dtype=torch.bool, device=dev)
    seen[_take(r, first) * n_ids + _take(gal.pid, _take(j, first))] = True
    distinct_rank = seen.view(c, n_ids).sum(1) + 1
    return R > 0, ap, inp, rank[:, 0], distinct_rank


def _cmc(first_rank, max_rank, num_valid):
    """Saturating CMC from 1-based first-hit ranks of the valid queries."""
    hist = torch.bincount(first_rank.clamp(max=max_rank + 1) - 1, minlength=max_rank + 1)
    return (torch.cumsum(hist, 0)[:max_rank].to(torch.float64) / num_valid).cpu().numpy()


def evaluate(distmat, q_pids, g_pids, q_camids=None, g_camids=None, protocol=None, max_rank=20,
             chunk_rows=None, memory_mb=DEFAULT_MEMORY_MB, return_per_query=False):
    """CMC, mAP and mINP of a query-by-gallery distance matrix under `protocol`.

    distmat: [nq, ng] numpy array or torch tensor (any device, any float dtype; half
        precision is upcast per chunk), smaller = closer. NaN is rejected.
    q_pids, g_pids, q_camids, g_camids: 1-D integer arrays or tensors. The camera arrays may
        be None for "regdb", which ignores cameras.
    protocol: "sysu", "llcm", "regdb" or "market" (module docstring); required.
    chunk_rows: query rows per chunk; default from `memory_mb` (module docstring).
    return_per_query: also return "per_query": numpy arrays valid, ap, inp, rank (first kept
        match, 1-based) and rank_distinct (0 for invalid queries' ranks and scores).

    Returns a dict: cmc (float64 [max_rank]; distinct-identity CMC for sysu/llcm, standard
    otherwise), cmc_standard, cmc_distinct, mAP, mINP (floats, fractions 0..1),
    num_valid_queries, num_queries, protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError("unknown protocol %r; expected one of %s" % (protocol, ", ".join(PROTOCOLS)))
    if int(max_rank) < 1:
        raise ValueError("max_rank must be >= 1, got %r" % (max_rank,))
    max_rank = int(max_rank)
    D = _to_tensor(distmat)
    if D.dim() != 2:
        raise ValueError("distmat must be 2-D [n_query, n_gallery], got shape %s" % (tuple(D.shape),))
    if not D.dtype.is_floating_point:
        D = D.to(torch.float64)
    nq, ng = D.shape
    dev = D.device
    q_pids = _as_labels(q_pids, "q_pids", nq, dev)
    g_pids = _as_labels(g_pids, "g_pids", ng, dev)
    if q_camids is None or g_camids is None:
        if protocol != "regdb":
            raise ValueError("protocol %r needs q_camids and g_camids" % protocol)
        q_camids, g_camids = torch.ones_like(q_pids), torch.full_like(g_pids, 2)
    q_camids = _as_labels(q_camids, "q_camids", nq, dev)
    g_camids = _as_labels(g_camids, "g_camids", ng, dev)
    if nq == 0 or ng == 0:
        raise ValueError("distmat is empty (shape %s): nothing to evaluate" % (tuple(D.shape),))

    gal = _Gallery(g_pids, g_camids)
    qidx = gal.index_of(q_pids)
    budget_bytes = int(memory_mb * (1 << 20))
    if chunk_rows is None:
        chunk_rows = max(1, budget_bytes // (_BYTES_PER_DISTANCE * ng))
    chunk_rows = max(1, int(chunk_rows))

    f64 = dict(dtype=torch.float64, device=dev)
    valid = torch.zeros(nq, dtype=torch.bool, device=dev)
    ap, inp = torch.zeros(nq, **f64), torch.zeros(nq, **f64)
    rank = torch.zeros(nq, dtype=torch.int64, device=dev)
    rank_distinct = torch.zeros(nq, dtype=torch.int64, device=dev)
    for s in range(0, nq, chunk_rows):
        e = min(s + chunk_rows, nq)
        chunk = D[s:e]
        if chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        chunk = chunk.contiguous()
        # A cheap sum flags NaN (or +inf and -inf together); only then look closer.
        if not torch.isfinite(chunk.sum()) and torch.isnan(chunk).any():
            raise ValueError("distmat contains NaN (query rows %d..%d)" % (s, e - 1))
        out = _evaluate_chunk(chunk, qidx[s:e], q_camids[s:e], gal, protocol, budget_bytes)
        valid[s:e], ap[s:e], inp[s:e], rank[s:e], rank_distinct[s:e] = out

    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a true match in the gallery under the %r protocol (%d queries, %d gallery "
            "items): check that query and gallery identities overlap and the camera ids" % (protocol, nq, ng))
    cmc_standard = _cmc(rank[valid], max_rank, num_valid)
    cmc_distinct = _cmc(rank_distinct[valid], max_rank, num_valid)
    result = dict(
        cmc=cmc_distinct if protocol in DISTINCT_CMC_PROTOCOLS else cmc_standard,
        cmc_standard=cmc_standard,
        cmc_distinct=cmc_distinct,
        mAP=float(ap[valid].mean()),
        mINP=float(inp[valid].mean()),
        num_valid_queries=num_valid,
        num_queries=nq,
        protocol=protocol,
    )
    if return_per_query:
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        result["per_query"] = dict(
            valid=valid.cpu().numpy(),
            ap=torch.where(valid, ap, zero.double()).cpu().numpy(),
            inp=torch.where(valid, inp, zero.double()).cpu().numpy(),
            rank=torch.where(valid, rank, zero).cpu().numpy(),
            rank_distinct=torch.where(valid, rank_distinct, zero).cpu().numpy(),
        )
    return result
