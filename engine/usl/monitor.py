"""Monitoring of the unsupervised stages: how the pseudo labels of each epoch look.

Per epoch and modality (:func:`label_stats`): the number of clusters and of outliers, and the
quality of the pseudo labels against the dataset's true identities on the clustered images
(outliers left out): NMI and ARI (scikit-learn's ``normalized_mutual_info_score`` and
``adjusted_rand_score``) and purity (the share of clustered images whose identity is their
cluster's most frequent one). **These figures are monitoring only**: the true identities never
reach the training, which sees the pseudo labels alone. Stage 2 adds the matching statistics
(:func:`match_stats`: clusters per side, IR clusters shared by two RGB clusters, pass-2 partners,
and the share of matched pairs whose majority identities agree, monitoring only) and the
neighbour-set sizes (:func:`neighbour_stats`); a camera-local run, its silhouette selection
(:func:`camera_stats`).

:func:`report` writes one epoch's figures to the log, tensorboard (``monitor/<stage>/...``) and
``metrics.jsonl`` as a record ``{"kind": "clusters", "monitoring_only": true, "stage",
"stage_index", "epoch", ...}``.
"""
import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from utils.io import append_jsonl


def _majority(labels, true_pids):
    """cluster label -> its most frequent true identity (ties: the smallest id)."""
    out = {}
    for label in np.unique(labels[labels >= 0]):
        ids, counts = np.unique(true_pids[labels == label], return_counts=True)
        out[int(label)] = int(ids[np.argmax(counts)])
    return out


def label_stats(labels, true_pids):
    """{clusters, outliers, images, nmi, ari, purity} of pseudo `labels` [N] against `true_pids` [N]
    (monitoring only; the quality figures are None when no image is clustered)."""
    labels, true_pids = np.asarray(labels), np.asarray(true_pids)
    clustered = labels >= 0
    stats = {"clusters": int(labels.max(initial=-1)) + 1, "outliers": int((~clustered).sum()), "images": len(labels),
             "nmi": None, "ari": None, "purity": None}
    if clustered.any():
        y, t = labels[clustered], true_pids[clustered]
        majority = _majority(labels, true_pids)
        stats.update(nmi=float(normalized_mutual_info_score(t, y)), ari=float(adjusted_rand_score(t, y)),
                     purity=float(np.mean([majority[int(l)] == int(p) for l, p in zip(y, t)])))
    return stats


def match_stats(match, labels_rgb, true_rgb, labels_ir, true_ir):
    """:meth:`cluster.matching.ClusterMatch.stats` plus ``agreement``: the share of RGB clusters
    whose IR partner has the same majority identity (monitoring only)."""
    stats = dict(match.stats())
    stats["mirror"] = bool(stats["mirror"])
    rgb, ir = _majority(np.asarray(labels_rgb), np.asarray(true_rgb)), _majority(np.asarray(labels_ir),
                                                                                 np.asarray(true_ir))
    agree = [rgb[r] == ir[match.rgb_to_ir(r)] for r in match.r2i]
    stats["agreement"] = float(np.mean(agree)) if agree else None
    return stats


def neighbour_stats(sets, removed=None):
    """Mean list length of each DTNL kind (ir, rgb, i2r, r2i) and the neighbours pruned per kind."""
    stats = {"mean_" + kind: float(np.mean([len(row) for row in getattr(sets, kind)]) if getattr(sets, kind) else 0.0)
             for kind in ("ir", "rgb", "i2r", "r2i")}
    if removed is not None:
        stats.update({"pruned_" + kind: int(n) for kind, n in removed.items()})
    return stats


def camera_stats(selection, epoch, kept):
    """The silhouette selection after `epoch`: whether this epoch's clustering is now the kept one."""
    return {"kept_this_epoch": bool(kept), "best_silhouette": float(selection.best_score),
            "best_epoch": selection.best_epoch}


def _flat(stats, prefix=""):
    out = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + key + "/"))
        else:
            out[prefix + key] = value
    return out


def _describe(stats):
    parts = []
    for group in ("rgb", "ir", "camera"):
        s = stats.get(group)
        if s:
            quality = ("NMI %.3f ARI %.3f purity %.3f" % (s["nmi"], s["ari"], s["purity"])
                       if s["nmi"] is not None else "no clustered image")
            parts.append("%s %d clusters, %d/%d outliers (%s)" % (group.upper(), s["clusters"], s["outliers"],
                                                                   s["images"], quality))
    if "match" in stats:
        m = stats["match"]
        parts.append("match %d RGB -> %d IR clusters%s, %d shared, %d pass-2 partners, majority agreement %s"
                     % (m["rgb_clusters"], m["ir_clusters"], " (mirror)" if m["mirror"] else "", m["shared_columns"],
                        m["second_pass_partners"], "%.3f" % m["agreement"] if m["agreement"] is not None else "-"))
    if "neighbours" in stats:
        n = stats["neighbours"]
        parts.append("neighbours per image ir %.1f rgb %.1f i2r %.1f r2i %.1f%s"
                     % (n["mean_ir"], n["mean_rgb"], n["mean_i2r"], n["mean_r2i"],
                        ", pruned %d ir / %d rgb" % (n["pruned_ir"], n["pruned_rgb"]) if "pruned_ir" in n else ""))
    if "selection" in stats:
        s = stats["selection"]
        parts.append("silhouette selection: best %.4f (epoch %s)%s" % (
            s["best_silhouette"], s["best_epoch"], ", kept this epoch" if s["kept_this_epoch"] else ""))
    return "; ".join(parts)


def report(stats, stage, epoch, logger, tb, metrics_path, step):
    """Log, tensorboard and metrics.jsonl record of one epoch's `stats` (module docstring)."""
    logger.info("clusters %s epoch %d: %s  [NMI/ARI/purity vs true identities: monitoring only]", stage.name, epoch,
                _describe(stats))
    tb.add_scalars("monitor/%s" % stage.name, {k: float(v) for k, v in _flat(stats).items()
                                                if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)
    record = {"kind": "clusters", "monitoring_only": True, "stage": stage.name, "stage_index": stage.index,
              "epoch": int(epoch)}
    record.update(stats)
    append_jsonl(metrics_path, record)
    return record
