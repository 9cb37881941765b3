"""Retrieval metrics of the VI-ReID protocols: CMC, mAP and mINP.

``evaluate(distmat [nq, ng], q_pids [nq], g_pids [ng], q_camids [nq], g_camids [ng], protocol)``
gives the numbers of the standard per-query code (eval_sysu / eval_llcm / eval_regdb of the
AGW/DEEN ``eval_metrics.py``, and the Market ``eval_func``) without a per-query Python loop;
tests/reference_eval.py is a per-query rewrite of that code, and tests/golden/ holds its
outputs.

Protocols (removal rule applied to every query's ranked gallery, then the metrics;
:func:`removed_items` is the rule for one query, the one the rank pictures of
evaluation/plots.py use):

=========  ==================================================  ==============================
protocol   gallery items removed for a query                   ``cmc`` returned
=========  ==================================================  ==============================
sysu       cam-3 query: every cam-2 item (any identity)        distinct-identity CMC
llcm       same identity and same camera                       distinct-identity CMC
regdb      nothing                                             standard CMC
market     same identity and same camera                       standard CMC
=========  ==================================================  ==============================

SYSU-MM01's infrared camera 3 and visible camera 2 film the same room, so the released code
drops every cam-2 item for a cam-3 query, whatever its identity; query and gallery cameras
never coincide there, so it has no same-camera rule. LLCM's visible and near-infrared
images share camera numbers, hence its same-identity, same-camera rule; RegDB's query and
gallery come from one camera pair and nothing is removed.

Standard CMC: 1 from the rank of the first kept true match on. Distinct-identity CMC (the
released code's "author's protocol"): the kept ranked list keeps only the first item of
each identity before ranks are counted. mAP (mean precision at the hits) and mINP (hits /
rank of the last hit) always use the full kept list. All three average over *valid*
queries, the ones with at least one kept true match.

How it works. Only the positions of a query's own identity in its ranked list matter: the
rank of a kept true match is 1 + the number of kept items ordered before it by (distance,
gallery index). Per chunk of query rows, each row's distances are sorted (values only,
after lowering everything beyond the row's last kept match, or beyond a few percent of
the row if that is further, to one value: the order of the rest is unchanged and the
sort is several times cheaper), and a binary search of each
member distance of the query's identity gives the number of items before it; the removed
members before it are known from the member list, and equal distances (rare) are
settled by direct comparison. The distinct-identity rank needs the identities of the
items before the first match, which are read only for the rows whose first match is
not at rank 1. SYSU removes items of every identity (cam 2 for a cam-3 query), so its
cam-3 queries are evaluated against the gallery without cam 2. Cost: one sort per row,
a few passes over the distances, and work proportional to the identity sizes and to
the items ranked before the first matches. The work is torch operations on the distance
matrix's device, so CUDA inputs are evaluated on the GPU; on CPU the sort, the dense
comparison and the index extraction use numpy (SIMD sort), several times faster there.

Memory: query rows are processed in chunks, by default as many rows as fit
``rows x (32 x n_gallery + 128 x m) bytes <= memory_mb / 2`` (256 MiB by default), m
being the largest number of gallery items of one identity (32 bytes per distance bound
the chunk's copy and its sort, 128 bytes per member the [rows, m] tables). The
rows whose first match is not at rank 1 are then read in blocks of at most
``memory_mb / 2 / (128 x n_gallery)`` rows, which bounds the extraction of the items
before the first match even when every item comes before it.

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

Differences from the Market-1501 evaluation of torchreid and fast-reid (their Python
``eval_market1501``: per query, argsort, drop same-identity same-camera items, cumsum, keep
``cmc[:max_rank]``, stack the queries' curves with ``np.asarray``), all for the same inputs:

* junk images: an identity of -1 is an ordinary identity here. Gallery items labelled -1 stay
  in every ranked list (a non-match for any other query, so they can push true matches down
  and lower rank-k and mAP) unless the caller drops them before calling :func:`evaluate`.
  torchreid's and fast-reid's Market-1501 dataset loaders skip every image whose identity is
  -1 when they read the folders, so their evaluation never sees junk images. Example: query
  id 1 (cam 1), gallery ids [-1, 1, 2] (cam 2) at distances [0.1, 0.2, 0.3]: here rank-1 = 0
  and mAP = 0.5; without the -1 item rank-1 = 1 and mAP = 1.
* a gallery with fewer than ``max_rank`` items: the CMC still has ``max_rank`` entries, the
  entries past the gallery's end repeating the last value (for ``n_gallery`` = 2,
  ``max_rank`` = 5 and a first hit at rank 2: [0, 1, 1, 1, 1]). Their code sets ``max_rank``
  to ``n_gallery`` and returns a CMC of ``n_gallery`` entries ([0, 1] in that example).
* removals that leave some queries fewer than ``max_rank`` kept items: an ordinary CMC of
  ``max_rank`` entries. Their code truncates each query's curve to its kept items, so when
  those lengths differ between queries (e.g. two queries keeping 2 and 3 of 4 items with
  ``max_rank`` = 4) the ragged list of curves makes ``np.asarray(...).astype(np.float32)``
  raise ValueError; when every query keeps the same number k < ``max_rank`` of items they
  return a CMC of k entries.
"""
import contextlib

import numpy as np
import torch


def _same_camera(q_cam, g_cam):
    return g_cam == q_cam


def _cam2_for_cam3_queries(q_cam, g_cam):
    return (g_cam == 2) & (q_cam == 3)


# The gallery-removal rules of every protocol: (same_identity, any_identity), each None or a
# function of the query camera and the gallery cameras (broadcasting, numpy or torch) that
# flags the items to remove; same_identity applies to the items of the query's identity
# only, any_identity to every item.
_REMOVAL_RULES = {
    "sysu": (None, _cam2_for_cam3_queries),
    "llcm": (_same_camera, None),
    "regdb": (None, None),
    "market": (_same_camera, None),
}
PROTOCOLS = tuple(_REMOVAL_RULES)
DISTINCT_CMC_PROTOCOLS = ("sysu", "llcm")

DEFAULT_MEMORY_MB = 256
# Half of the memory budget bounds a chunk: per distance its copy (float64 at most) and,
# on a GPU, the capped copy and its sort (values and indices; the CPU sorts 4 MiB blocks
# instead), per member of the query's identity about fifteen [rows, members] tables of 8
# bytes. The other half bounds the blocks of rows read for the distinct-identity ranks:
# per distance its copy, mask bytes and, in the worst case (every item before the first
# match), about a dozen 8-byte values per item.
_BYTES_PER_DISTANCE = 32
_BYTES_PER_MEMBER = 128
_BYTES_PER_CANDIDATE = 128
# Rows per CPU sort block: about 2**_BLOCK_BITS bytes (see _search_rows).
_BLOCK_BITS = 22
# CPU tensors take the numpy paths (SIMD sort, faster comparisons and index extraction);
# the torch paths are the ones that run on GPUs, and the tests run them on CPU by turning
# this off.
NUMPY_ON_CPU = True


def _numpy_path(t):
    return NUMPY_ON_CPU and t.device.type == "cpu"


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


def _check_protocol(protocol):
    if protocol not in _REMOVAL_RULES:
        raise ValueError("unknown protocol %r; expected one of %s" % (protocol, ", ".join(PROTOCOLS)))


def removed_items(protocol, q_pid, q_camid, g_pids, g_camids):
    """Boolean mask [ng] of the gallery items `protocol` removes from one query's ranked list
    (module docstring). g_pids, g_camids: 1-D arrays; ValueError for an unknown protocol."""
    _check_protocol(protocol)
    same_identity, any_identity = _REMOVAL_RULES[protocol]
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    removed = np.zeros(g_pids.shape, dtype=bool)
    if same_identity is not None:
        removed |= (g_pids == q_pid) & same_identity(q_camid, g_camids)
    if any_identity is not None:
        removed |= any_identity(q_camid, g_camids)
    return removed


def _row_groups(protocol, q_camids, g_camids):
    """Split the queries so that no group's protocol removes items of other identities.

    Returns [(rows, cols)]: query row indices and gallery column indices (ascending), None
    meaning all. The queries of a camera for which the protocol removes items of any
    identity (sysu: cam 3) are evaluated against the gallery without those items.
    """
    any_identity = _REMOVAL_RULES[protocol][1]
    if any_identity is None:
        return [(None, None)]
    groups = []
    plain = torch.ones_like(q_camids, dtype=torch.bool)
    for cam in torch.unique(q_camids).tolist():
        removed = any_identity(cam, g_camids)
        if bool(removed.any()):
            rows = q_camids == cam
            plain &= ~rows
            groups.append((torch.nonzero(rows).squeeze(1), torch.nonzero(~removed).squeeze(1)))
    if not groups:
        return [(None, None)]
    if bool(plain.any()):
        groups.append((torch.nonzero(plain).squeeze(1), None))
    return groups


def _search_rows(D, cap, values):
    """Binary search of values [c, m] in the rows of D [c, n], each row's entries above
    cap [c] (a bound above every value looked up) first lowered to it.

    Returns below [c, m] (entries smaller than the value), next_equal [c, m] (the entry
    after those, at position below + 1, equals the value too: when the value is itself
    an entry, another entry shares it) and has_nan [c].
    """
    c, n = D.shape
    on_cpu = _numpy_path(D)
    # Any cap above the looked-up values gives the same answers. A cap below a few percent
    # of a long row leaves almost all of it equal, which the SIMD sort handles three times
    # slower than a full sort of a few percent, so the cap is raised to about the 7th
    # percentile of 64 sampled columns.
    if n >= 1024:
        sample = D[:, ::n // 64][:, :64]
        if on_cpu:
            floor = torch.from_numpy(np.partition(sample.numpy(), 4, axis=1)[:, 4])
        else:
            floor = torch.kthvalue(sample, 5, dim=1).values
        cap = torch.maximum(cap, floor)
    below = torch.empty(values.shape, dtype=torch.int64, device=D.device)
    next_equal = torch.empty(values.shape, dtype=torch.bool, device=D.device)
    has_nan = torch.empty(c, dtype=torch.bool, device=D.device)
    # On CPU, numpy's SIMD sort is an order of magnitude faster than torch's, and faster
    # still on the many equal values the cap leaves; blocks of about 4 MiB are capped,
    # sorted and searched while they are in cache (about 12% faster than one pass each
    # over an LLCM-size chunk).
    step = max(1, (1 << _BLOCK_BITS) // (n * D.element_size())) if on_cpu else c
    buffer = np.empty((min(step, c), n), D.numpy().dtype) if on_cpu else None
    for s in range(0, c, step):
        e = min(s + step, c)
        if on_cpu:
            block = buffer[:e - s]
            np.minimum(D.numpy()[s:e], cap.numpy()[s:e, None], out=block)
            block.sort(axis=1)
            block = torch.from_numpy(block)
        else:
            block = torch.sort(torch.minimum(D[s:e], cap[s:e, None]), dim=1).values
        v = values[s:e]
        b = torch.searchsorted(block, v, side="left")
        below[s:e] = b
        next_equal[s:e] = (block.gather(1, (b + 1).clamp(max=n - 1)) == v) & (b + 1 < n)
        has_nan[s:e] = torch.isnan(block[:, -1])  # NaN sorts last
    return below, next_equal, has_nan


def _flat_nonzero(mask):
    """Flat indices of the non-zero entries of a contiguous tensor, ascending."""
    if _numpy_path(mask):
        # numpy's flatnonzero is several times faster than torch's CPU nonzero.
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


def _members(D, qidx, qcam, gal, protocol):
    """Every gallery item of each row's identity, ordered by (distance, gallery index).

    Returns dist [c, m], col [c, m] and kept [c, m] (False for the items the protocol
    removes); slots past the identity's size are padding (distance +inf, column n_gallery,
    not kept).
    """
    c, n = D.shape
    count = torch.where(qidx >= 0, gal.count[qidx.clamp(min=0)], torch.zeros_like(qidx))
    m = max(int(count.max()), 1) if c else 1
    slot = torch.arange(m, device=D.device)
    pos = (gal.start[qidx.clamp(min=0)][:, None] + slot).clamp(max=n - 1)
    col = torch.where(slot < count[:, None], gal.members[pos], torch.full_like(pos, n))
    dist = D.gather(1, col.clamp(max=n - 1)).masked_fill(col == n, float("inf"))
    # The columns are ascending here, so a stable sort by distance orders by (distance, index).
    dist, order = torch.sort(dist, dim=1, stable=True)
    col = col.gather(1, order)
    kept = col < n
    same_identity = _REMOVAL_RULES[protocol][0]
    if same_identity is not None:
        kept &= ~same_identity(qcam[:, None], gal.cam[col.clamp(max=n - 1)])
    return dist, col, kept


def _equal_before(D, rows, d, col, budget_bytes):
    """How many items of row rows[i] of D have distance exactly d[i] and a gallery index
    below col[i], for every i; temporaries stay within budget_bytes."""
    n = D.shape[1]
    index = torch.arange(n, device=D.device)
    step = max(1, budget_bytes // (n * (D.element_size() + 10)))
    out = []
    for s in range(0, len(rows), step):
        equal = (D.index_select(0, rows[s:s + step]) == d[s:s + step, None]) & (index < col[s:s + step, None])
        out.append(equal.sum(1))
    return torch.cat(out)


def _distinct_rank(D, qidx, gal, d1, c1, tie1, deep, budget_bytes):
    """1 + the number of distinct identities among the kept items ordered before each row's
    first kept match (distance d1 [c], column c1 [c]). Only rows flagged `deep` (first
    match below rank 1) have any; tie1 flags the rows where other items share d1. The
    rows are read in blocks whose temporaries stay within budget_bytes."""
    c, n = D.shape
    dev = D.device
    n_ids = len(gal.ids)
    index = torch.arange(n, device=dev)
    rows = torch.nonzero(deep).squeeze(1)
    step = max(1, budget_bytes // (n * _BYTES_PER_CANDIDATE))
    pairs = [torch.zeros(0, dtype=torch.int64, device=dev)]
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        sub, threshold = D.index_select(0, r), d1.index_select(0, r)[:, None]
        if _numpy_path(sub):
            before = torch.from_numpy(sub.numpy() < threshold.numpy())
        else:
            before = sub < threshold
        tied = torch.nonzero(tie1.index_select(0, r)).squeeze(1)
        if len(tied):
            # equal distances come before the first match when their index is lower
            before[tied] |= (sub[tied] == threshold[tied]) & (index < c1.index_select(0, r[tied])[:, None])
        flat = _flat_nonzero(before)
        local = torch.div(flat, n, rounding_mode="floor")
        pid = gal.pid.index_select(0, flat - local * n)
        row = r.index_select(0, local)
        # Same-identity items before the first kept match are removed ones: not counted.
        other = pid != qidx.index_select(0, row)
        pairs.append(torch.unique(row[other] * n_ids + pid[other]))
    pairs = torch.cat(pairs)
    return 1 + torch.bincount(torch.div(pairs, n_ids, rounding_mode="floor"), minlength=c)


def _evaluate_rows(D, qidx, qcam, gal, protocol, budget_bytes, row_ids):
    """Per-row valid flag, AP, INP, first-hit rank and distinct-identity rank of a block of
    rows [c, n] whose protocol removes no item of another identity (module docstring).
    row_ids [c]: the rows' query indices, for error messages."""
    c = D.shape[0]
    dev = D.device
    dist, col, kept = _members(D, qidx, qcam, gal, protocol)
    m = dist.shape[1]
    R = kept.sum(1)
    last = dist.masked_fill(~kept, -float("inf")).amax(1)
    before, next_equal, has_nan = _search_rows(D, torch.nextafter(last, torch.full_like(last, float("inf"))), dist)
    if bool(has_nan.any()):
        raise ValueError("distmat contains NaN (query row %d)" % int(row_ids[has_nan][0]))
    tie = kept & next_equal
    if bool(tie.any()):
        rows = torch.arange(c, device=dev)[:, None].expand(c, m)[tie]
        before[tie] += _equal_before(D, rows, dist[tie], col[tie], budget_bytes)
    kept_before = torch.cumsum(kept, 1) - kept.long()
    removed_before = torch.arange(m, device=dev) - kept_before
    rank = before - removed_before + 1  # of the kept matches; meaningless elsewhere
    Rf = R.clamp(min=1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    ap = torch.where(kept, (kept_before + 1).to(torch.float64) / rank, zero).sum(1) / Rf
    inp = Rf / torch.where(kept, rank, torch.zeros_like(rank)).amax(1).clamp(min=1)
    first = kept.int().argmax(1, keepdim=True)  # the first kept member ranks first
    first_rank = rank.gather(1, first).squeeze(1)
    distinct_rank = _distinct_rank(D, qidx, gal, dist.gather(1, first).squeeze(1), col.gather(1, first).squeeze(1),
                                   tie.gather(1, first).squeeze(1), (R > 0) & (first_rank > 1), budget_bytes)
    return R > 0, ap, inp, first_rank, distinct_rank


def _cmc(first_rank, max_rank, num_valid):
    """Saturating CMC from 1-based first-hit ranks of the valid queries."""
    hist = torch.bincount(first_rank.clamp(max=max_rank + 1) - 1, minlength=max_rank + 1)
    return (torch.cumsum(hist, 0)[:max_rank].to(torch.float64) / num_valid).cpu().numpy()


@contextlib.contextmanager
def _one_intra_op_thread(distmat):
    """Run the CPU evaluation with one torch intra-op thread.

    Its torch ops are small and memory-bound and its big sorts are numpy's single-threaded
    SIMD sort, so a second thread gains nothing when the machine is idle (LLCM-sized random
    problem, 4000 x 3500: 0.19 s with one thread, 0.20 s with two), while under two competing
    processes the spinning threads of a two-thread pool made it 0.75-2.6 s against 0.26-0.43 s
    with one (2 cores). The caller's setting is restored afterwards.
    """
    before = torch.get_num_threads()
    on_cpu = not (isinstance(distmat, torch.Tensor) and distmat.device.type != "cpu")
    if on_cpu and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def evaluate(distmat, q_pids, g_pids, q_camids=None, g_camids=None, protocol=None, max_rank=20,
             chunk_rows=None, memory_mb=DEFAULT_MEMORY_MB, return_per_query=False):
    """CMC, mAP and mINP of a query-by-gallery distance matrix under `protocol`.

    On CPU it runs with one torch intra-op thread (:func:`_one_intra_op_thread`).

    distmat: [nq, ng] numpy array or torch tensor (any device, any float dtype; half
        precision is upcast per chunk), smaller = closer. NaN is rejected.
    q_pids, g_pids, q_camids, g_camids: 1-D integer arrays or tensors. The camera arrays may
        be None for "regdb", which ignores cameras. Every pid, -1 (Market-1501 junk) included,
        is an ordinary identity: drop junk items before the call to exclude them (module
        docstring, differences from torchreid / fast-reid).
    protocol: "sysu", "llcm", "regdb" or "market" (module docstring); required.
    chunk_rows: query rows per chunk; default from `memory_mb` (module docstring).
    return_per_query: also return "per_query": numpy arrays valid, ap, inp, rank (first kept
        match, 1-based) and rank_distinct (0 for invalid queries' ranks and scores).

    Returns a dict: cmc (float64 [max_rank], always max_rank entries, also for a gallery or a
    kept list shorter than max_rank, where the last value repeats; distinct-identity CMC for
    sysu/llcm, standard otherwise), cmc_standard, cmc_distinct, mAP, mINP (floats, fractions 0..1),
    num_valid_queries, num_queries, protocol.
    """
    with _one_intra_op_thread(distmat):
        return _evaluate(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank, chunk_rows, memory_mb,
                         return_per_query)


def _evaluate(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank, chunk_rows, memory_mb,
              return_per_query):
    _check_protocol(protocol)
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

    budget_bytes = int(memory_mb * (1 << 20))
    f64 = dict(dtype=torch.float64, device=dev)
    valid = torch.zeros(nq, dtype=torch.bool, device=dev)
    ap, inp = torch.zeros(nq, **f64), torch.zeros(nq, **f64)
    rank = torch.zeros(nq, dtype=torch.int64, device=dev)
    rank_distinct = torch.zeros(nq, dtype=torch.int64, device=dev)
    all_rows = torch.arange(nq, device=dev)
    for rows, cols in _row_groups(protocol, q_camids, g_camids):
        if cols is not None and len(cols) == 0:
            continue  # an empty gallery: these queries have no match
        gal = _Gallery(g_pids, g_camids) if cols is None else _Gallery(g_pids[cols], g_camids[cols])
        n_rows = nq if rows is None else len(rows)
        n_cols = ng if cols is None else len(cols)
        step = chunk_rows
        if step is None:
            row_bytes = _BYTES_PER_DISTANCE * n_cols + _BYTES_PER_MEMBER * int(gal.count.max())
            step = budget_bytes // 2 // row_bytes
        step = max(1, int(step))
        for s in range(0, n_rows, step):
            e = min(s + step, n_rows)
            index = slice(s, e) if rows is None else rows[s:e]
            chunk = D[index]
            if cols is not None:
                chunk = chunk.index_select(1, cols)
            if chunk.dtype in (torch.float16, torch.bfloat16):
                chunk = chunk.float()
            chunk = chunk.contiguous()
            out = _evaluate_rows(chunk, gal.index_of(q_pids[index]), q_camids[index], gal, protocol,
                                 budget_bytes // 2, all_rows[index])
            valid[index], ap[index], inp[index], rank[index], rank_distinct[index] = out

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
