"""DBSCAN on a sparse Jaccard distance, with the labels of sklearn's DBSCAN on the dense matrix.

``dbscan_labels(jaccard, eps, min_samples=4)`` -> int64 numpy [N]: sklearn
``DBSCAN(eps, min_samples, metric="precomputed")`` run on the radius graph of the
:class:`cluster.jaccard.SparseJaccard` (its pairs with distance <= eps, compared in float32
as sklearn compares the dense float32 matrix, and the diagonal). A point is a core point
when at least ``min_samples`` points, itself included, lie within eps; clusters are the
connected core points with the points they reach, numbered in the order their first point
appears; -1 marks noise (outliers).

Pairs missing from the sparse matrix have distance exactly 1.0, the largest Jaccard
distance. For eps < 1 they never count, so the radius graph gives the dense result. For
eps >= 1 (in float32) every pair lies within eps: all points form one cluster (label 0)
when there are at least ``min_samples`` of them, else all are noise, which is again the
dense result; no graph is built.
"""
import numpy as np
from sklearn.cluster import DBSCAN

DEFAULT_MIN_SAMPLES = 4


def covers_all_pairs(eps):
    """Whether radius `eps` reaches distance 1.0, that of the pairs a SparseJaccard leaves out (float32)."""
    return bool(np.float32(eps) >= 1.0)


def dbscan_labels(jaccard, eps, min_samples=DEFAULT_MIN_SAMPLES, n_jobs=None):
    """Cluster labels [N] (int64, -1 = outlier) of a SparseJaccard at radius `eps` (module docstring).

    n_jobs: sklearn's worker count for the neighbourhood queries (the labels do not depend on it).
    """
    eps = float(eps)
    if not eps > 0:
        raise ValueError("DBSCAN eps must be > 0, got %r" % eps)
    if int(min_samples) < 1:
        raise ValueError("DBSCAN min_samples must be >= 1, got %r" % min_samples)
    if covers_all_pairs(eps) and jaccard.max_distance is None:
        return np.full(jaccard.n, 0 if jaccard.n >= int(min_samples) else -1, dtype=np.int64)
    graph = jaccard.radius_graph(eps)
    labels = DBSCAN(eps=eps, min_samples=int(min_samples), metric="precomputed", n_jobs=n_jobs).fit_predict(graph)
    return labels.astype(np.int64)


def cluster_counts(labels):
    """(number of clusters, number of outliers) of DBSCAN labels."""
    labels = np.asarray(labels)
    return int(labels.max(initial=-1)) + 1, int((labels == -1).sum())
