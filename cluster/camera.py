"""Silhouette selection of the camera-local clusterings (SYSU-MM01).

A camera-local run re-clusters the images of one camera every epoch and keeps the
clustering of the epoch whose silhouette is best:

* from epoch ``first_epoch`` on (10; epochs counted from 0), the clustering made at the start
  of the epoch is scored with sklearn's ``silhouette_score(jaccard, labels,
  metric="precomputed")`` on the dense [N, N] Jaccard distance; the outliers (label -1) count
  as one more cluster;
* it replaces the kept one when its score is larger than every earlier score and than 0.

The score needs the dense matrix: N is one camera's images (a few thousand on SYSU), so it
holds 4 N^2 bytes for the call. A clustering with fewer than 2 or more than N - 1 distinct
labels has no silhouette: it is scored None and never kept.

Each camera has its own DBSCAN radius, cfg.USL.CAMERA.EPS[camera id] (0-based ids; the
reference runs use 0.2, 0.2, 0.6, 0.5, 0.5, 0.2 for SYSU's cameras 0..5).
"""
import numpy as np
import torch
from sklearn.metrics import silhouette_score

from utils.errors import ConfigError

FIRST_EPOCH = 10


def camera_eps(cfg, camera):
    """The DBSCAN radius of camera id `camera`'s local run: cfg.USL.CAMERA.EPS[camera]."""
    radii = list(cfg.USL.CAMERA.EPS)
    if not 0 <= int(camera) < len(radii):
        raise ConfigError("USL.CAMERA.EPS has %d entries (one per camera id); camera %d has none"
                          % (len(radii), int(camera)))
    return float(radii[int(camera)])


def silhouette(jaccard, labels):
    """sklearn's precomputed silhouette of `labels` on a complete SparseJaccard, or None (module docstring)."""
    labels = np.asarray(labels)
    if labels.shape != (jaccard.n,):
        raise ValueError("labels must hold one entry per image ([%d]), got shape %s" % (jaccard.n, labels.shape))
    if not 2 <= len(np.unique(labels)) <= jaccard.n - 1:
        return None
    return float(silhouette_score(jaccard.to_dense().numpy(), labels, metric="precomputed"))


class CameraLocalSelection:
    """The best-silhouette clustering of one camera-local run so far (module docstring).

    ``update(epoch, jaccard, labels)`` scores the clustering of that epoch and returns True
    when it becomes the kept one. ``state_dict()`` holds plain values and the kept labels as an
    int64 tensor, for resuming a run.
    """

    def __init__(self, first_epoch=FIRST_EPOCH):
        self.first_epoch = int(first_epoch)
        self.best_score = 0.0
        self.best_epoch = None
        self.labels = None

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.USL.CAMERA.FIRST_EPOCH)

    def update(self, epoch, jaccard, labels):
        if int(epoch) < self.first_epoch:
            return False
        score = silhouette(jaccard, labels)
        if score is None or not score > self.best_score:
            return False
        self.best_score, self.best_epoch = score, int(epoch)
        self.labels = np.asarray(labels, dtype=np.int64).copy()
        return True

    def state_dict(self):
        return {"first_epoch": self.first_epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "labels": None if self.labels is None else torch.from_numpy(self.labels.copy())}

    def load_state_dict(self, state):
        self.first_epoch = int(state["first_epoch"])
        self.best_score = float(state["best_score"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.labels = None if state["labels"] is None else torch.as_tensor(state["labels"]).numpy().astype(np.int64)
