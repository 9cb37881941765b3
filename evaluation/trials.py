"""Multi-trial evaluation and its printed table.

SYSU-MM01 and LLCM are evaluated over 10 trials, each with its own randomly sampled gallery,
and report the plain mean over trials (the CMC element-wise), as the released test code
does. That code re-extracts the gallery features every trial; here features are extracted
once for the queries and for every gallery candidate any trial uses, and a trial is a column
subset of one distance matrix [nq, n_candidates], which gives the same numbers:

``evaluate_trials(distmat, q_pids, g_pids, q_camids, g_camids, trials, protocol)`` evaluates
each trial with evaluation.metrics.evaluate and returns a JSON-serialisable dict:

* ``per_trial``: one dict per trial: ``rank1``, ``rank5``, ``rank10``, ``rank20`` (those
  <= max_rank), ``mAP``, ``mINP``, ``cmc`` (list, max_rank values), ``num_valid_queries``,
  ``num_gallery``;
* ``mean`` and ``std``: the same figures (and ``cmc`` element-wise) over trials, std being the
  population standard deviation (ddof = 0; 0 for a single trial);
* ``protocol``, ``max_rank``, ``num_trials``, ``reranked``.

All figures are fractions in [0, 1]; ``format_table`` prints them in percent.

Re-ranking (off by default) is applied per trial to that trial's columns. ``rerank`` is
either a dict ``{"q_q": [nq, nq], "g_g": [n_candidates, n_candidates], "k1": 20, "k2": 6,
"lambda_value": 0.3, "expansion": "released", "dtype": torch.float32}`` (all but q_q and g_g
optional, with those defaults: the expansion rule of the re-ranking authors' released code)
for evaluation.rerank.k_reciprocal_rerank, whose distances (distmat, q_q, g_g) are squared
Euclidean, or a callable ``f(q_g_trial, columns) -> distmat`` for any other scheme.
"""
import numpy as np
import torch

from evaluation.metrics import evaluate

RANKS = (1, 5, 10, 20)
SCALARS = tuple("rank%d" % k for k in RANKS) + ("mAP", "mINP")
_RERANK_PARAMS = ("k1", "k2", "lambda_value", "expansion", "dtype")
_RERANK_KEYS = {"q_q", "g_g", *_RERANK_PARAMS}


def _tensor(x):
    return x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _reranker(rerank):
    """A function (q_g_trial, columns) -> distance, or None."""
    if rerank is None or callable(rerank):
        return rerank
    if not isinstance(rerank, dict):
        raise ValueError("rerank must be None, a dict or a callable, got %s" % type(rerank).__name__)
    unknown = set(rerank) - _RERANK_KEYS
    if unknown or not {"q_q", "g_g"} <= set(rerank):
        raise ValueError("rerank dict needs keys q_q and g_g (optional %s); got %s"
                         % (", ".join(_RERANK_PARAMS), sorted(rerank)))
    from evaluation.rerank import k_reciprocal_rerank

    q_q, g_g = _tensor(rerank["q_q"]), _tensor(rerank["g_g"])
    params = {k: rerank[k] for k in _RERANK_PARAMS if k in rerank}

    def apply(q_g, cols):
        cols_g = cols.to(g_g.device)
        return k_reciprocal_rerank(q_g, q_q, g_g.index_select(0, cols_g).index_select(1, cols_g), **params)

    return apply


def _trial_record(res, max_rank, num_gallery):
    cmc = [float(x) for x in res["cmc"]]
    record = {"rank%d" % k: cmc[k - 1] for k in RANKS if k <= max_rank}
    record.update(mAP=res["mAP"], mINP=res["mINP"], cmc=cmc,
                  num_valid_queries=int(res["num_valid_queries"]), num_gallery=int(num_gallery))
    return record


def evaluate_trials(distmat, q_pids, g_pids, q_camids, g_camids, trials=None, protocol=None, max_rank=20,
                    rerank=None, **evaluate_kwargs):
    """Evaluate every trial (a list of gallery column index arrays; None = all columns).

    distmat [nq, n_candidates] (numpy or torch, any device), labels as for
    evaluation.metrics.evaluate, g_* over all candidates. Extra keyword arguments go to
    evaluation.metrics.evaluate (chunk_rows, memory_mb). Returns the dict of the module docstring.
    """
    D = _tensor(distmat)
    if D.dim() != 2:
        raise ValueError("distmat must be 2-D [n_query, n_gallery], got shape %s" % (tuple(D.shape),))
    ng = D.shape[1]
    g_pids = _tensor(g_pids).cpu().numpy()
    g_camids = None if g_camids is None else _tensor(g_camids).cpu().numpy()
    if trials is None:
        trials = [None]
    if len(trials) == 0:
        raise ValueError("trials is empty: give a list of gallery column index arrays, or None for all columns")
    reranker = _reranker(rerank)
    per_trial = []
    for t, cols in enumerate(trials):
        cols = np.arange(ng) if cols is None else _tensor(cols).cpu().numpy().astype(np.int64).reshape(-1)
        if len(cols) == 0 or cols.min() < 0 or cols.max() >= ng:
            raise ValueError("trial %d: gallery column indices must be non-empty and within 0..%d" % (t, ng - 1))
        cols_t = torch.from_numpy(cols).to(D.device)
        d = D.index_select(1, cols_t)
        if reranker is not None:
            d = reranker(d, cols_t)
        try:
            res = evaluate(d, q_pids, g_pids[cols], q_camids, None if g_camids is None else g_camids[cols],
                           protocol, max_rank, **evaluate_kwargs)
        except ValueError as exc:
            raise ValueError("trial %d: %s" % (t, exc)) from None
        per_trial.append(_trial_record(res, max_rank, len(cols)))

    keys = [k for k in SCALARS if k in per_trial[0]]
    table = {k: np.array([r[k] for r in per_trial], dtype=np.float64) for k in keys}
    cmc = np.array([r["cmc"] for r in per_trial], dtype=np.float64)
    mean = {k: float(v.mean()) for k, v in table.items()}
    std = {k: float(v.std(ddof=0)) for k, v in table.items()}
    mean["cmc"], std["cmc"] = cmc.mean(0).tolist(), cmc.std(0, ddof=0).tolist()
    return dict(protocol=protocol, max_rank=int(max_rank), num_trials=len(per_trial), reranked=reranker is not None,
                per_trial=per_trial, mean=mean, std=std)


def format_table(result, title=None, verbose=False):
    """The printed table of an evaluate_trials result, figures in percent.

    One row per trial with verbose=True (labelled by the record's "trial" when present),
    then the mean, with "± std" unless the result is known to hold a single trial. Works on
    any dict with "mean" and "std" (and optionally "per_trial", "num_trials") in that layout.
    """
    per_trial = result.get("per_trial") or []
    mean, std = result["mean"], result["std"]
    names = [k for k in SCALARS if k in mean]
    header = {k: ("Rank-%s" % k[4:] if k.startswith("rank") else k) for k in names}
    n_trials = result.get("num_trials") or len(per_trial)
    with_std = not n_trials or n_trials > 1
    cell = 15 if with_std else 8
    lines = [title] if title else []
    label_width = 12
    lines.append("%-*s" % (label_width, "") + "".join("%*s" % (cell, header[k]) for k in names))
    if verbose:
        for i, r in enumerate(per_trial):
            label = "trial %s" % r.get("trial", i)
            lines.append("%-*s" % (label_width, label) + "".join("%*.2f" % (cell, 100 * r[k]) for k in names))
    if with_std:
        row = "".join("%*s" % (cell, "%.2f ± %.2f" % (100 * mean[k], 100 * std[k])) for k in names)
        lines.append("%-*s" % (label_width, "mean ± std") + row)
    else:
        lines.append("%-*s" % (label_width, "result") + "".join("%*.2f" % (cell, 100 * mean[k]) for k in names))
    return "\n".join(lines)
