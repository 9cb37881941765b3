"""Per-query loop reference of the standard VI-ReID / Market evaluation (CMC, mAP, mINP).

Written from the protocol description, one query at a time, in the way the standard
``eval_sysu`` / ``eval_llcm`` / ``eval_regdb`` and Market ``eval_func`` work, quirks included:

* the gallery is ranked once with ``np.argsort(distmat, axis=1)`` (numpy's default, unstable
  quicksort; pass ``sort_kind="stable"`` to break ties by gallery index instead);
* removal rules: sysu drops every cam-2 gallery item for cam-3 queries, llcm and market drop
  same-pid-and-same-camera items, regdb drops nothing;
* queries without a kept true match are skipped; if none is left an AssertionError is raised;
* sysu and llcm return the distinct-identity CMC (rows truncated per query to
  ``min(max_rank, #distinct kept ids)``, so ragged rows fail in ``np.asarray``), regdb and
  market the standard CMC;
* ``max_rank`` is lowered to the gallery size when the gallery is smaller.

This module is the independent expectation the vectorized ``evaluation.metrics`` is tested and
benchmarked against; it is deliberately simple and slow.
Shapes: distmat [nq, ng] (smaller = closer), pids / camids 1-D int arrays.
"""
import numpy as np

PROTOCOLS = ("sysu", "llcm", "regdb", "market")


def _removed(protocol, q_pid, q_cam, g_pids_ranked, g_cams_ranked):
    if protocol == "sysu":
        return (q_cam == 3) & (g_cams_ranked == 2)
    if protocol in ("llcm", "market"):
        return (g_pids_ranked == q_pid) & (g_cams_ranked == q_cam)
    if protocol == "regdb":
        return np.zeros(len(g_pids_ranked), dtype=bool)
    raise ValueError(f"unknown protocol {protocol!r}")


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank=20,
                       sort_kind=None):
    """Standard evaluation, one query at a time.

    Returns dict(cmc (float32, the CMC the standard code returns for `protocol`),
    cmc_standard (float32), mAP, mINP (float64), num_valid_queries (int)).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    if sort_kind is None:
        indices = np.argsort(distmat, axis=1)
    else:
        indices = np.argsort(distmat, axis=1, kind=sort_kind)
    ranked_pids = g_pids[indices]
    ranked_cams = g_camids[indices]

    distinct_rows, standard_rows, aps, inps = [], [], [], []
    num_valid = 0
    for qi in range(num_q):
        q_pid, q_cam = q_pids[qi], q_camids[qi]
        keep = ~_removed(protocol, q_pid, q_cam, ranked_pids[qi], ranked_cams[qi])
        kept_pids = ranked_pids[qi][keep]

        first_index = np.unique(kept_pids, return_index=True)[1]
        distinct_pids = kept_pids[np.sort(first_index)]
        distinct_rows.append((distinct_pids == q_pid).astype(np.int32).cumsum()[:max_rank])

        hits = (kept_pids == q_pid).astype(np.int32)
        if not hits.any():
            continue
        num_valid += 1
        cum_hits = hits.cumsum()
        last = np.max(np.where(hits == 1)[0])
        inps.append(cum_hits[last] / (last + 1.0))
        standard = cum_hits.copy()
        standard[standard > 1] = 1
        standard_rows.append(standard[:max_rank])
        precision = cum_hits / np.arange(1.0, len(hits) + 1.0)
        aps.append((precision * hits).sum() / hits.sum())

    assert num_valid > 0, "Error: all query identities do not appear in gallery"
    standard_cmc = np.asarray(standard_rows).astype(np.float32).sum(0) / num_valid
    distinct_cmc = np.asarray(distinct_rows).astype(np.float32).sum(0) / num_valid
    cmc = distinct_cmc if protocol in ("sysu", "llcm") else standard_cmc
    return dict(cmc=cmc, cmc_standard=standard_cmc, mAP=np.mean(aps), mINP=np.mean(inps),
                num_valid_queries=num_valid)


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    r = reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, "sysu", max_rank)
    return r["cmc"], r["mAP"], r["mINP"]


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    r = reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, "llcm", max_rank)
    return r["cmc"], r["mAP"], r["mINP"]


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
    num_q, num_g = np.shape(distmat)
    r = reference_evaluate(distmat, q_pids, g_pids, np.ones(num_q, np.int64),
                           2 * np.ones(num_g, np.int64), "regdb", max_rank)
    return r["cmc"], r["mAP"], r["mINP"]


def eval_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    r = reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, "market", max_rank)
    return r["cmc"], r["mAP"], r["mINP"]
