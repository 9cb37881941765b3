"""The per-epoch pseudo-labelling step: unit-norm features -> Jaccard distance -> DBSCAN labels.

``PseudoLabeller(eps, k1=30, k2=6, min_samples=4)(x [N, D])`` -> :class:`PseudoLabels` with
``labels`` (int64 numpy [N], cluster ids 0..C-1 in DBSCAN's discovery order, -1 for the
outliers, which the epoch leaves out), ``num_clusters`` and ``num_outliers``; ``jaccard`` is
the sparse distance when the labeller keeps it (the camera-local runs score their
clustering with it), else None.

The rows of x are the L2-normalised flip-averaged features of one modality's training
images (cluster.features). Defaults are the reference values (k1 30, k2 6, min_samples 4);
eps is per dataset and run (0.6 on SYSU-MM01, 0.2 on RegDB). Without ``keep_distances``
only the pairs within eps are stored, which bounds the memory by the number of close pairs.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cluster.dbscan import DEFAULT_MIN_SAMPLES, cluster_counts, covers_all_pairs, dbscan_labels
from cluster.jaccard import SparseJaccard, jaccard_distance
from cluster.knn import DEFAULT_MEMORY_MB


@dataclass
class PseudoLabels:
    labels: np.ndarray
    num_clusters: int
    num_outliers: int
    jaccard: Optional[SparseJaccard] = None


class PseudoLabeller:
    """Features -> pseudo labels with fixed clustering settings (module docstring)."""

    def __init__(self, eps, k1=30, k2=6, min_samples=DEFAULT_MIN_SAMPLES, knn_backend="torch", device=None,
                 memory_mb=DEFAULT_MEMORY_MB, keep_distances=False):
        if not float(eps) > 0:
            raise ValueError("DBSCAN eps must be > 0, got %r" % eps)
        if int(k1) < 1 or int(k2) < 1:
            raise ValueError("k1 and k2 must be >= 1, got k1=%r, k2=%r" % (k1, k2))
        self.eps, self.k1, self.k2 = float(eps), int(k1), int(k2)
        self.min_samples = int(min_samples)
        self.knn_backend, self.device, self.memory_mb = knn_backend, device, memory_mb
        self.keep_distances = bool(keep_distances)

    @classmethod
    def from_config(cls, cfg, eps=None, device=None, keep_distances=False):
        """Settings from cfg.USL.CLUSTER; `eps` overrides USL.CLUSTER.EPS (the camera-local runs)."""
        c = cfg.USL.CLUSTER
        return cls(c.EPS if eps is None else eps, k1=c.K1, k2=c.K2, min_samples=c.MIN_SAMPLES,
                   knn_backend=c.KNN_BACKEND, device=device, memory_mb=c.MEMORY_MB, keep_distances=keep_distances)

    def __call__(self, features):
        # Only pairs within eps matter to DBSCAN; keeping all is for scoring the clustering.
        jaccard = jaccard_distance(features, self.k1, self.k2, knn_backend=self.knn_backend, device=self.device,
                                   memory_mb=self.memory_mb,
                                   max_distance=None if self.keep_distances or covers_all_pairs(self.eps) else self.eps)
        labels = dbscan_labels(jaccard, self.eps, self.min_samples)
        num_clusters, num_outliers = cluster_counts(labels)
        return PseudoLabels(labels, num_clusters, num_outliers, jaccard if self.keep_distances else None)
