"""Test-time embeddings: extraction (with flip TTA) and the distance used for ranking.

:func:`extract_features` runs images through the model in eval mode (``modality`` picks the
visible or infrared path of models that have one) and returns the model's embedding sets as
a dict name -> float32 CPU tensor [N, D] (CMFN: ``pool_orig``, ``bn_orig``, ``pool_br1``,
``bn_br1``, ``pool_br2``, ``bn_br2``; IV-REID: ``bn``, ``pool``). The model L2-normalises each
set. With flip TTA (TEST.FLIP) every image is also run mirrored on the width axis and the two
normalised outputs are summed (TEST.FLIP_MODE "sum", the released CMFN: norm up to 2, not
renormalised) or averaged and L2-normalised again ("mean", as CAJ does; each set then has unit
norm, which changes the weighting between the sets and so the rankings of the combined
embeddings). "average_raw" (released TokenMatcher / CMAG) averages the *unnormalised*
descriptors of the image and of its mirror and then L2-normalises: the model provides them
through ``embed(images, modality) -> [N, D]``, the raw form of its single embedding set.

:func:`distance_from_features` turns query and gallery features into a distance matrix
[nq, ng] (smaller = closer) for an embedding preset of the model (TEST.FEATURE; each model
declares its presets as {set: weight}, :func:`embedding_weights`). A weighted sum of inner
products is the inner product of the concatenations of the sqrt(w_i)-scaled sets, so each
distance is a single [nq, S*D] x [S*D, ng] matmul. For TEST.DISTANCE "euclidean" the same
concatenation is used, so the squared distance ("sqeuclidean") is sum_i w_i ||q_i - g_i||^2.

:func:`evaluate_split` (used by train.py; test.py calls its two halves
:func:`extract_split_features` and :func:`evaluate_features`) extracts the query images and
the gallery images used by at least one trial once each, and evaluates every trial as a
column subset of one distance matrix with evaluation.trials.evaluate_trials.

Re-ranking (TEST.RERANK) works on the squared Euclidean distances of the weighted
concatenations for the query-gallery, query-query and gallery-gallery matrices, as torchreid
and fast-reid re-rank, whatever TEST.DISTANCE is (it decides the ranking without re-ranking):
on the flip-summed features (norms up to 2) the cosine distance would give other k-reciprocal
neighbourhoods. Precision: :func:`evaluate_features` computes its distances (and re-ranks)
in TEST.DISTANCE_DTYPE (float64 by default: test.py's reported numbers, so that near ties
below float32 resolution keep their order); :func:`evaluate_split`, the in-training
evaluation, uses float32 unless told otherwise.

:func:`save_features` / :func:`load_features` write and read a folder of .npy features with
identities, cameras, paths and trials (test.py --save-features, tools/visualize_ranks.py).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from engine.distributed import unwrap_model
from utils.errors import ConfigError

FLIP_MODES = ("sum", "mean", "average_raw")


def embedding_weights(model, preset=""):
    """[(set name, weight)] of the model's embedding `preset` (empty: the model's default)."""
    cls = type(unwrap_model(model))
    try:
        return cls.embedding_weights(preset)
    except ValueError:
        raise ConfigError("TEST.FEATURE %r is not an embedding of the %s model (known: %s)"
                          % (preset, cls.__name__, ", ".join(cls.embedding_presets))) from None


def _as_dataset(images, cfg):
    """A dataset of (image tensor, index) from an ImageList, a list of paths or a Dataset."""
    if isinstance(images, Dataset):
        return images
    from data import TestImageDataset

    # TestImageDataset names every missing file before any worker starts
    return TestImageDataset(list(getattr(images, "paths", images)), cfg)


def _raw_descriptor(model):
    """The model's unnormalised descriptor ``embed(images, modality)`` and the name of its single
    embedding set, for TEST.FLIP_MODE average_raw."""
    inner = unwrap_model(model)
    sets = type(inner).embedding_sets
    if not callable(getattr(inner, "embed", None)) or len(sets) != 1:
        raise ConfigError("TEST.FLIP_MODE average_raw needs a model with one embedding set and an unnormalised "
                          "embed(images, modality) descriptor (TokenMatcher / CMAG); the %s model has none: use "
                          "sum or mean" % type(inner).__name__)
    return inner.embed, sets[0]


def _autocast(device, amp):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError("TEST.AMP must be 'none' or 'bf16', got %r" % (amp,))


@torch.no_grad()
def extract_features(model, images, cfg, modality, device, flip=None, flip_mode=None, amp=None, camids=None,
                     keep=None):
    """Embeddings of `images` (ImageList, list of paths, or a Dataset of (img, index) items).

    `flip`, `flip_mode` and `amp` default to cfg.TEST.FLIP / FLIP_MODE / AMP. The images'
    camera ids (`camids` [N], default ``images.camids`` of an ImageList) are passed to the model
    as ``camids`` [B], as the released FusionReID evaluation does for its camera embedding;
    models without one ignore them. `keep`: the set names to keep (default all), so that the
    features of a large gallery hold only what the ranking uses. The model is put
    in eval mode for the extraction and its previous mode is restored afterwards.
    Returns {set name: float32 CPU tensor [N, D]} in the model's ``embedding_sets`` order.
    """
    flip = cfg.TEST.FLIP if flip is None else flip
    flip_mode = cfg.TEST.FLIP_MODE if flip_mode is None else flip_mode
    amp = cfg.TEST.AMP if amp is None else amp
    if flip_mode not in FLIP_MODES:
        raise ValueError("TEST.FLIP_MODE must be one of %s, got %r" % (", ".join(FLIP_MODES), flip_mode))
    if modality not in ("visible", "infrared"):
        raise ValueError("modality must be 'visible' or 'infrared', got %r" % (modality,))
    device = torch.device(device)
    dataset = _as_dataset(images, cfg)
    loader = DataLoader(
        dataset,
        batch_size=cfg.TEST.BATCH_SIZE,
        shuffle=False,
        num_workers=cfg.TEST.NUM_WORKERS,
        pin_memory=device.type == "cuda",
    )
    n = len(dataset)
    if camids is None:
        camids = getattr(images, "camids", None)
    if camids is not None:
        camids = torch.as_tensor(np.asarray(camids), dtype=torch.int64).reshape(-1)
        if len(camids) != n:
            raise ValueError("%d camera ids for %d images" % (len(camids), n))
    out = None
    raw = _raw_descriptor(model) if flip and flip_mode == "average_raw" else None
    was_training = model.training
    model.eval()
    try:
        for imgs, index in loader:
            imgs = imgs.to(device, non_blocking=True)
            index = index.long()
            cams = None if camids is None else camids[index].to(device)
            with _autocast(device, amp):
                if raw is not None:
                    embed, name = raw
                    mean = (embed(imgs, modality).float() + embed(torch.flip(imgs, dims=[3]), modality).float()) / 2
                    sets = {name: F.normalize(mean, dim=1)}
                else:
                    sets = model(imgs, modality=modality, camids=cams)
                    if flip:
                        flipped = model(torch.flip(imgs, dims=[3]), modality=modality, camids=cams)
            for name, f in sets.items():
                if keep is not None and name not in keep:
                    continue
                f = f.float()
                if flip and raw is None:
                    f = f + flipped[name].float()
                    if flip_mode == "mean":
                        f = F.normalize(f, dim=1)
                if f.shape[0] != imgs.shape[0]:
                    raise RuntimeError("model returned %d rows of %s for a batch of %d" % (f.shape[0], name, imgs.shape[0]))
                if out is None:
                    out = {}
                if name not in out:
                    out[name] = torch.empty(n, f.shape[1], dtype=torch.float32)
                out[name][index] = f.cpu()
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("no images to extract features from")
    return out


def stack_features(feats, weights):
    """[N, S*D] concatenation of the sets of `weights` ([(set, weight)]), each scaled by sqrt(weight)."""
    parts = []
    for name, w in weights:
        f = feats[name].float()
        parts.append(f if w == 1.0 else f * math.sqrt(w))
    return torch.cat(parts, dim=1)


def distance_from_features(qfeats, gfeats, weights, metric="cosine", device=None, squared=False,
                           dtype=torch.float32):
    """Distance matrix [nq, ng] of `dtype` (smaller = closer) on `device` (default: the features').

    `weights`: [(set, weight)] of the embedding. cosine: -(sum_i w_i q_i g_i^T); euclidean:
    distance between the weighted concatenations; sqeuclidean (or squared=True): its square,
    which k-reciprocal re-ranking expects. dtype: torch.float32 / torch.float64 or "float32" /
    "float64" (float64 computes the products in float64).
    """
    from evaluation.distance import compute_distance

    q = stack_features(qfeats, weights)
    g = stack_features(gfeats, weights)
    if device is not None:
        q, g = q.to(device), g.to(device)
    if metric == "sqeuclidean":
        metric, squared = "euclidean", True
    return compute_distance(q, g, metric=metric, squared=squared, dtype=dtype)


def used_gallery_columns(split):
    """Sorted gallery indices that at least one trial uses, and the trials re-indexed to them."""
    n = len(split.gallery)
    trials = [np.arange(n) if t is None else np.asarray(t, dtype=np.int64) for t in split.trials]
    used = np.unique(np.concatenate(trials)) if trials else np.arange(n)
    position = np.full(n, -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    return used, [position[t] for t in trials]


def extract_split_features(model, split, cfg, device, flip=None, keep=None):
    """Features of the query images and of the gallery images any trial uses (only the sets
    `keep`, when given).

    Returns (qfeats, gfeats, used, trials): `used` indexes split.gallery, `trials` index the
    rows of gfeats.
    """
    used, trials = used_gallery_columns(split)
    gallery_paths = [split.gallery.paths[i] for i in used]
    qfeats = extract_features(model, split.query, cfg, split.query_modality, device, flip=flip, keep=keep)
    gfeats = extract_features(model, gallery_paths, cfg, split.gallery_modality, device, flip=flip,
                              camids=split.gallery.camids[np.asarray(used, dtype=np.int64)], keep=keep)
    return qfeats, gfeats, used, trials


def evaluate_features(qfeats, gfeats, split, cfg, weights, used=None, trials=None, device=None, dtype=None):
    """evaluate_trials result for features of split.query and split.gallery[used].

    `weights`: the embedding's [(set, weight)] (:func:`embedding_weights`). `used`/`trials`
    as returned by :func:`extract_split_features` (default: every gallery image,
    split.trials). `dtype`: precision of the distances and of re-ranking, "float32" or
    "float64" (default cfg.TEST.DISTANCE_DTYPE). Without re-ranking the distance is
    TEST.DISTANCE; with TEST.RERANK it is the squared Euclidean distance (module docstring),
    re-ranked per trial. Adds "distmat" (numpy [nq, n_used] of `dtype`: that distance before
    re-ranking) to the result.
    """
    from evaluation.distance import distance_dtype
    from evaluation.trials import evaluate_trials

    if used is None:
        used, trials = used_gallery_columns(split)
    dtype = distance_dtype(cfg.TEST.DISTANCE_DTYPE if dtype is None else dtype)
    rerank = None
    if cfg.TEST.RERANK:
        distmat = distance_from_features(qfeats, gfeats, weights, "sqeuclidean", device, dtype=dtype)
        rerank = dict(
            q_q=distance_from_features(qfeats, qfeats, weights, "sqeuclidean", device, dtype=dtype),
            g_g=distance_from_features(gfeats, gfeats, weights, "sqeuclidean", device, dtype=dtype),
            k1=cfg.TEST.RERANK_K1,
            k2=cfg.TEST.RERANK_K2,
            lambda_value=cfg.TEST.RERANK_LAMBDA,
            expansion=cfg.TEST.RERANK_EXPANSION,
            dtype=dtype,
        )
    else:
        distmat = distance_from_features(qfeats, gfeats, weights, cfg.TEST.DISTANCE, device, dtype=dtype)
    result = evaluate_trials(
        distmat,
        split.query.pids,
        split.gallery.pids[used],
        split.query.camids,
        split.gallery.camids[used],
        trials,
        split.protocol,
        max_rank=cfg.TEST.MAX_RANK,
        rerank=rerank,
    )
    result["distmat"] = distmat.cpu().numpy()
    return result


def evaluate_split(model, split, cfg, device, flip=None, feature=None, dtype="float32"):
    """Extract and evaluate one TestSplit; `flip` None means cfg.TEST.FLIP.

    Returns the evaluation.trials.evaluate_trials dict (per_trial, mean, std) for the
    model's embedding preset `feature` (default cfg.TEST.FEATURE, empty = the model's
    default). train.py's periodic evaluation passes flip=False as released. `dtype`: the
    distance precision, float32 by default (in-training evaluation; None means
    cfg.TEST.DISTANCE_DTYPE, test.py's float64 default).
    """
    weights = embedding_weights(model, cfg.TEST.FEATURE if feature is None else feature)
    qfeats, gfeats, used, trials = extract_split_features(model, split, cfg, device, flip=flip,
                                                          keep={name for name, _ in weights})
    result = evaluate_features(qfeats, gfeats, split, cfg, weights, used, trials, device=device, dtype=dtype)
    result.pop("distmat")
    return result


def save_features(folder, split, qfeats, gfeats, used, trials, settings=None):
    """Write features and everything needed to re-evaluate them into `folder`.

    Files: ``{query,gallery}_<set>.npy`` (float32 [N, D]), ``{query,gallery}_{pids,camids}.npy``
    (int64) and ``split.json`` (paths, trials as row indices of the gallery arrays, protocol,
    modalities, split info, `settings`). Gallery rows are split.gallery[used].
    """
    from utils.io import save_json, save_npy

    for side, feats in (("query", qfeats), ("gallery", gfeats)):
        for name, f in feats.items():
            save_npy(os.path.join(folder, "%s_%s.npy" % (side, name)), f.numpy())
    save_npy(os.path.join(folder, "query_pids.npy"), np.asarray(split.query.pids, dtype=np.int64))
    save_npy(os.path.join(folder, "query_camids.npy"), np.asarray(split.query.camids, dtype=np.int64))
    save_npy(os.path.join(folder, "gallery_pids.npy"), np.asarray(split.gallery.pids, dtype=np.int64)[used])
    save_npy(os.path.join(folder, "gallery_camids.npy"), np.asarray(split.gallery.camids, dtype=np.int64)[used])
    save_json(os.path.join(folder, "split.json"), {
        "protocol": split.protocol,
        "query_modality": split.query_modality,
        "gallery_modality": split.gallery_modality,
        "feature_sets": list(qfeats),
        "query_paths": list(split.query.paths),
        "gallery_paths": [split.gallery.paths[i] for i in used],
        "trials": [np.asarray(t).tolist() for t in trials],
        "info": split.info,
        "settings": settings or {},
    })


def load_features(folder):
    """Read a :func:`save_features` folder back: a dict with ``split`` (the JSON),
    ``query`` / ``gallery`` (feature dicts of tensors), ``query_pids``, ``query_camids``,
    ``gallery_pids``, ``gallery_camids`` (numpy) and ``trials`` (list of int64 arrays)."""
    import json

    meta_path = os.path.join(folder, "split.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError("%s not found (expected a folder written by test.py --save-features)" % meta_path)
    with open(meta_path) as f:
        meta = json.load(f)
    out = {"split": meta, "trials": [np.asarray(t, dtype=np.int64) for t in meta["trials"]]}
    for side in ("query", "gallery"):
        out[side] = {name: torch.from_numpy(np.load(os.path.join(folder, "%s_%s.npy" % (side, name))))
                     for name in meta["feature_sets"]}
        for what in ("pids", "camids"):
            out["%s_%s" % (side, what)] = np.load(os.path.join(folder, "%s_%s.npy" % (side, what)))
    return out
