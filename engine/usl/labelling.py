"""Per-epoch pseudo-labelling of the unsupervised stages: features, clusters, memories.

At the start of every epoch, for each modality the stage trains on (visible = RGB, infrared = IR):

1. ``features`` [N, D]: the flip-average of the encoder's unnormalised descriptor of every
   training image (:class:`RawDescriptor`, :func:`cluster.features.extract_train_features`;
   eval mode, clustering-time transform: bicubic resize, no augmentation; RGB images through the
   visible stem, IR through the infrared one), and ``normalised`` = its L2-normalised rows;
2. pseudo labels [N] (int64, -1 = outlier, left out of the epoch): the k-reciprocal Jaccard
   distance of ``normalised`` and DBSCAN (:class:`cluster.pseudo_labels.PseudoLabeller`);
3. centroids [C, D]: the L2-normalised mean of each cluster's *unnormalised* features, in label
   order (:func:`normalised_centroids`), the initial banks of the cluster memories.

Per stage kind (:class:`EpochLabeller`):

* ``stage1``: one memory per modality (``memories["ir"]``, ``memories["rgb"]``, momentum
  USL.MOMENTUM);
* ``camera``: the images of one camera only (camera-local run), one memory
  (``memories["camera"]``, momentum USL.CAMERA.MOMENTUM); the clustering is also offered to the
  run's :class:`cluster.camera.CameraLocalSelection` (silhouette on the dense Jaccard distance);
* ``stage2``: the DTNL neighbour sets of the normalised features (when USL.LAMBDA_NEIGHBOUR is
  not 0), pruned with the camera-local clusterings (USL.CAMERA_PRUNING; its draws come from
  Python's ``random``), the greedy cross-modal match of the centroids, and the six memories of
  :class:`loss.tokenmatcher.Stage2Memories` (mixed, per-modality, and the normalised features as
  instance banks).

The result, an :class:`EpochLabels`, holds what the epoch's iterations need; ``state_dict()``
(tensors and plain values) and :meth:`EpochLabels.from_state_dict` let a run interrupted in the
middle of an epoch continue with exactly those labels, banks (as the iterations moved them),
neighbour lists and match. The true identities of the listings are read only by the monitoring
(:mod:`engine.usl.monitor`).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cluster.camera import CameraLocalSelection
from cluster.dtnl import NeighbourSets, dtnl_neighbour_sets, prune_by_camera
from cluster.features import extract_train_features
from cluster.matching import ClusterMatch, MatchingError, match_clusters, mixed_centroids
from cluster.pseudo_labels import PseudoLabeller
from data.pseudo import ExtractionSet, ModalityListing
from data.usl_transforms import ClusterTransform
from engine.distributed import unwrap_model
from engine.usl.monitor import camera_stats, label_stats, match_stats, neighbour_stats
from loss.cluster_memory import ClusterMemory
from loss.distances import identity_centres
from loss.tokenmatcher import Stage2Memories
from model.base import INFRARED, VISIBLE
from utils.errors import ConfigError, UserError

MODALITY_KEYS = {VISIBLE: "rgb", INFRARED: "ir"}
MODALITY_NAMES = {VISIBLE: "visible", INFRARED: "infrared"}


class ClusteringError(UserError, RuntimeError):
    """The clustering of an epoch left nothing to train on, or cannot be matched."""


class RawDescriptor(nn.Module):
    """The encoder's unnormalised descriptor as an eval-mode embedding set: ``{"feat": [N, K*E]}``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images, modality, camids=None):
        return {"feat": self.encoder.embed(images, modality)}


class _Items(Dataset):
    """``(image [3, H, W], position)`` items of an :class:`data.pseudo.ExtractionSet`."""

    def __init__(self, listing, transform):
        self.inner = ExtractionSet(listing, transform)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, k):
        item = self.inner[k]
        return item["images"], item["index"]


def extract(model, listing, cfg, device, batch_size):
    """(features, normalised) float32 CPU [N, D] of `listing` (module docstring, step 1)."""
    transform = ClusterTransform(cfg.USL.INPUT.SIZE, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    return extract_train_features(RawDescriptor(unwrap_model(model)), _Items(listing, transform),
                                  MODALITY_NAMES[listing.modality], device, "feat", batch_size=int(batch_size),
                                  num_workers=int(cfg.DATALOADER.NUM_WORKERS))


@torch.no_grad()
def calibrate_batchnorm(model, listings, cfg, device, batch_size):
    """Replace every BatchNorm's running statistics of `model` with the cumulative statistics of
    the training images (visible, infrared listings) under the clustering-time transform: batches
    of RGB rows then IR rows, as in a training batch, everything but the BatchNorms in eval mode
    (no stochastic depth, no ghost batches); a last batch of a single image is left out, as
    BatchNorm needs two. Returns the number of batches."""
    transform = ClusterTransform(cfg.USL.INPUT.SIZE, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    encoder = unwrap_model(model)
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = encoder.training
    encoder.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    half = max(1, int(batch_size) // 2)
    rgb, ir = listings
    batches = 0
    try:
        for start in range(0, max(len(rgb), len(ir)), half):
            parts = [(lst, range(start, min(start + half, len(lst)))) for lst in (rgb, ir)]
            images = [transform(lst.images[i]) for lst, rows in parts for i in rows]
            if len(images) < 2:
                continue
            modality = [lst.modality for lst, rows in parts for _ in rows]
            encoder(torch.stack(images).to(device), torch.tensor(modality, device=device))
            batches += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        encoder.train(was_training)
    return batches


def normalised_centroids(features, labels):
    """[C, D]: the L2-normalised mean of the rows of `features` [N, D] per label 0..C-1 (-1 left out)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    keep = labels >= 0
    centres, ids, _ = identity_centres(features[keep], labels[keep])
    if not torch.equal(ids, torch.arange(len(ids))):
        raise ValueError("pseudo labels must be 0..C-1, got %s" % ids.tolist())
    return F.normalize(centres, dim=1)


def training_listings(listings, cfg):
    """The (visible, infrared) listings trained on: all of them, or with SOLVER.SELECT_BY val the
    images of the held-out identities removed (the last DATASET.VAL_IDS, as the val split holds
    them); the remaining images are numbered 0..N-1 again."""
    if cfg.SOLVER.SELECT_BY != "val":
        return listings
    num_ids = int(max(lst.true_pids.max() for lst in listings)) + 1
    first = num_ids - int(cfg.DATASET.VAL_IDS)
    kept = []
    for lst in listings:
        part = lst.subset(np.flatnonzero(lst.true_pids < first))
        kept.append(ModalityListing(part.modality, part.images, part.paths, part.cams, part.true_pids))
    return tuple(kept)


def _memory(bank, cfg, momentum, device):
    return ClusterMemory.from_bank(bank, temp=cfg.USL.TEMP, momentum=momentum, use_hard=cfg.USL.USE_HARD).to(device)


def _pairs(mapping):
    return [[int(k), [int(x) for x in v] if isinstance(v, list) else int(v)] for k, v in mapping.items()]


def _match_state(match):
    return {"r2i": _pairs(match.r2i), "i2r": _pairs(match.i2r), "mirror": bool(match.mirror),
            "counts": match.counts.clone(), "similarity": match.similarity.clone()}


def _match_from_state(state):
    return ClusterMatch(r2i={k: v for k, v in state["r2i"]}, i2r={k: v for k, v in state["i2r"]},
                        mirror=bool(state["mirror"]), counts=state["counts"], similarity=state["similarity"])


@dataclass
class EpochLabels:
    """One epoch's pseudo labels (``labels``: modality key -> int64 numpy [N]), memories, stage-2
    neighbour sets and match (module docstring)."""

    kind: str
    labels: dict
    memories: nn.Module
    neighbours: Optional[NeighbourSets] = None
    match: Optional[ClusterMatch] = None

    def state_dict(self):
        return {"kind": self.kind, "labels": {k: torch.from_numpy(v.copy()) for k, v in self.labels.items()},
                "banks": {k: v.detach().cpu().clone() for k, v in self.memories.state_dict().items()},
                "neighbours": None if self.neighbours is None else self.neighbours.pack(),
                "match": None if self.match is None else _match_state(self.match)}

    @classmethod
    def from_state_dict(cls, state, cfg, device):
        """The epoch state saved by :meth:`state_dict`, memories built with `cfg`'s settings on `device`."""
        kind = state["kind"]
        banks = {name[:-len(".features")]: bank for name, bank in state["banks"].items()}
        if kind == "stage2":
            memories = _stage2_memories(banks, cfg, device)
        else:
            momentum = cfg.USL.MOMENTUM if kind == "stage1" else cfg.USL.CAMERA.MOMENTUM
            memories = nn.ModuleDict({k: _memory(b, cfg, momentum, device) for k, b in banks.items()})
        neighbours = None if state["neighbours"] is None else NeighbourSets.unpack(state["neighbours"])
        match = None if state["match"] is None else _match_from_state(state["match"])
        labels = {k: v.numpy().astype(np.int64) for k, v in state["labels"].items()}
        return cls(kind, labels, memories, neighbours, match)


def _stage2_memories(banks, cfg, device):
    usl = cfg.USL
    return Stage2Memories.from_banks(banks, temp=usl.TEMP, mixed_momentum=usl.MOMENTUM_MIXED,
                                     modality_momentum=usl.MOMENTUM_MODALITY, use_hard=usl.USE_HARD).to(device)


def camera_local_lookup(camera_local):
    """camera -> {image row: local label} of the camera-local clusterings (camera -> (rows, labels))."""
    return {int(cam): {int(r): int(l) for r, l in zip(rows.tolist(), labels.tolist()) if l >= 0}
            for cam, (rows, labels) in camera_local.items()}


class EpochLabeller:
    """Labels the epochs of every stage of a run over the training `listings` (visible, infrared)."""

    def __init__(self, cfg, listings, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.listings = {VISIBLE: listings[0], INFRARED: listings[1]}
        if cfg.USL.LAMBDA_NEIGHBOUR != 0 and not 1 <= cfg.USL.DTNL_VOTES <= cfg.MODEL.TOKENMATCHER.NUM_TOKENS:
            raise ConfigError("USL.DTNL_VOTES must be between 1 and MODEL.TOKENMATCHER.NUM_TOKENS (%d), got %d"
                              % (cfg.MODEL.TOKENMATCHER.NUM_TOKENS, cfg.USL.DTNL_VOTES))

    def camera_listing(self, stage):
        """The listing of a camera-local stage's images (positions 0..n-1, ``rows`` the global indices)."""
        return self.listings[stage.modality].camera(stage.camera)

    def _cluster(self, model, listing, eps, what, stage_name, epoch, batch_size, keep_distances=False):
        features, normalised = extract(model, listing, self.cfg, self.device, batch_size)
        result = PseudoLabeller.from_config(self.cfg, eps=eps, device=self.device,
                                            keep_distances=keep_distances)(normalised)
        if result.num_clusters == 0:
            raise ClusteringError(
                "%s epoch %d: DBSCAN (eps %g, min_samples %d) left all %d %s images as outliers, nothing to train "
                "on; change the radius (USL.CLUSTER.EPS, USL.CAMERA.EPS) or check the model"
                % (stage_name, epoch, eps, self.cfg.USL.CLUSTER.MIN_SAMPLES, len(listing), what))
        return features, normalised, result

    def __call__(self, stage, model, epoch, selection=None, camera_local=None):
        """(:class:`EpochLabels`, monitoring stats) of `stage`'s `epoch` (module docstring)."""
        if stage.kind == "camera":
            return self._camera(stage, model, epoch, selection)
        batch = self.cfg.USL.EXTRACT_BATCH
        clustered = {}
        for modality in (VISIBLE, INFRARED):
            clustered[modality] = self._cluster(model, self.listings[modality], stage.eps, MODALITY_NAMES[modality],
                                                stage.name, epoch, batch)
        labels = {MODALITY_KEYS[m]: clustered[m][2].labels for m in clustered}
        stats = {MODALITY_KEYS[m]: label_stats(clustered[m][2].labels, self.listings[m].true_pids)
                 for m in clustered}
        centroids = {m: normalised_centroids(clustered[m][0], clustered[m][2].labels) for m in clustered}
        usl = self.cfg.USL
        if stage.kind == "stage1":
            memories = nn.ModuleDict({MODALITY_KEYS[m]: _memory(centroids[m], self.cfg, usl.MOMENTUM, self.device)
                                      for m in (INFRARED, VISIBLE)})
            return EpochLabels("stage1", labels, memories), stats
        return self._stage2(clustered, centroids, labels, stats, camera_local)

    def _camera(self, stage, model, epoch, selection):
        listing = self.camera_listing(stage)
        what = "%s camera-%d" % (MODALITY_NAMES[stage.modality], stage.camera)
        features, _, result = self._cluster(model, listing, stage.eps, what, stage.name, epoch,
                                            self.cfg.USL.CAMERA.EXTRACT_BATCH, keep_distances=True)
        kept = selection.update(epoch, result.jaccard, result.labels)
        memory = _memory(normalised_centroids(features, result.labels), self.cfg, self.cfg.USL.CAMERA.MOMENTUM,
                         self.device)
        stats = {"camera": label_stats(result.labels, listing.true_pids),
                 "selection": camera_stats(selection, epoch, kept)}
        return EpochLabels("camera", {"camera": result.labels}, nn.ModuleDict({"camera": memory})), stats

    def _stage2(self, clustered, centroids, labels, stats, camera_local):
        cfg, usl = self.cfg, self.cfg.USL
        (f_rgb, n_rgb, _), (f_ir, n_ir, _) = clustered[VISIBLE], clustered[INFRARED]
        neighbours = None
        if usl.LAMBDA_NEIGHBOUR != 0:
            neighbours = dtnl_neighbour_sets(n_ir.to(self.device), n_rgb.to(self.device),
                                             cfg.MODEL.TOKENMATCHER.NUM_TOKENS, usl.DTNL_THRESHOLD, usl.DTNL_VOTES,
                                             usl.DTNL_CHUNK)
            removed = None
            if usl.CAMERA_PRUNING:
                ir, rgb = self.listings[INFRARED], self.listings[VISIBLE]
                removed = prune_by_camera(neighbours, list(range(len(ir))), ir.cams.tolist(), list(range(len(rgb))),
                                          rgb.cams.tolist(), camera_local_lookup(camera_local), decay=usl.PRUNE_DECAY,
                                          fix_prune_skip=usl.FIX_PRUNE_SKIP)
            stats["neighbours"] = neighbour_stats(neighbours, removed)
        try:
            match = match_clusters(centroids[VISIBLE], centroids[INFRARED], usl.MATCH_CAPACITY,
                                   allow_mirror=cfg.DATASET.NAME == "regdb" or usl.FIX_SYSU_MIRROR_BRANCH,
                                   fix_second_pass=usl.FIX_MATCH_SECOND_PASS)
        except MatchingError as exc:
            raise ClusteringError("stage2: %s; USL.FIX_MATCH_SECOND_PASS True gives each unmatched cluster one partner "
                                  "in the second pass (and a smaller USL.MATCH_CAPACITY makes this rarer)" % exc) from None
        stats["match"] = match_stats(match, labels["rgb"], self.listings[VISIBLE].true_pids, labels["ir"],
                                     self.listings[INFRARED].true_pids)
        mixed_ir, mixed_rgb = mixed_centroids(f_rgb, f_ir, labels["rgb"], labels["ir"], match)
        banks = {"mixed_ir": mixed_ir, "mixed_rgb": mixed_rgb, "modality_ir": centroids[INFRARED],
                 "modality_rgb": centroids[VISIBLE]}
        if neighbours is not None:
            banks.update(instance_ir=n_ir, instance_rgb=n_rgb)
        return EpochLabels("stage2", labels, _stage2_memories(banks, cfg, self.device), neighbours, match), stats


def new_selection(cfg):
    """The silhouette selection of a camera-local run (USL.CAMERA.FIRST_EPOCH)."""
    return CameraLocalSelection(first_epoch=cfg.USL.CAMERA.FIRST_EPOCH)
