"""DTNL neighbour sets: image neighbours on which all class tokens agree, pruned per camera.

**Selection.** The features are the L2-normalised concatenations of K token embeddings
[N, K*W]; token t is the column slice ``t*W:(t+1)*W``, used as it is (not re-normalised).
For a query set Q and a gallery set G, per token t::

    S_t = Q_t @ G_t.T;   candidates_t(i) = { j : S_t[i, j] > threshold * max_j S_t[i, j] }

(strict, in the features' dtype). An index j is kept for query i when it is a candidate for
at least ``min_votes`` tokens (default K: all of them), in first-occurrence order: the
ascending candidates of token 0, then those first seen in token 1, and so on (with
``min_votes = K`` this is ascending). :func:`dtnl_neighbour_sets` builds the four lists of
stage 2: ``ir`` (IR -> IR), ``rgb`` (RGB -> RGB), ``i2r`` (IR anchor -> RGB images) and ``r2i``
(RGB anchor -> IR images); intra-modality lists normally hold the anchor itself. Rows are
processed in chunks so that only [chunk, N] similarities exist at a time.

**Camera-aware pruning** (:func:`prune_by_camera`) uses a camera-local clustering per camera
(``camera_local[cam]``: file name -> local cluster label, labels compared for equality only).
For an anchor whose file is in its own camera's clustering, a neighbour is *prunable* when it
was taken by the same camera, is itself in that clustering, and has another local label.
For each prunable neighbour one number is drawn from ``rng.random()`` and the neighbour is
removed when it is ``<= decay`` (decay 1: always, but the generator still advances). Anchors
or neighbours absent from the clustering (local outliers) are left alone. Anchors are
visited IR first, then RGB; each anchor prunes its intra-modality list, then its cross list.

By default the released behaviour is kept exactly: the neighbour is removed from the list
being scanned, so **the element right after each removed neighbour is never examined** (and
may survive although prunable). ``fix_prune_skip=True`` examines every element instead.

:class:`NeighbourSets` holds the four lists; ``pack()`` / ``unpack()`` turn them into int64
tensors (values and row offsets) for checkpoints.
"""
import random
from dataclasses import dataclass

import torch

_KINDS = ("ir", "rgb", "i2r", "r2i")
_ABSENT = object()


@dataclass
class NeighbourSets:
    """The stage-2 neighbour lists: ``ir``, ``rgb``, ``i2r``, ``r2i`` (lists of int lists)."""

    ir: list
    rgb: list
    i2r: list
    r2i: list

    def pack(self):
        """{"<kind>_values", "<kind>_offsets"} int64 tensors (row b = values[offsets[b]:offsets[b+1]])."""
        state = {}
        for kind in _KINDS:
            rows = getattr(self, kind)
            lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
            state[kind + "_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
            state[kind + "_values"] = torch.tensor([j for row in rows for j in row], dtype=torch.int64)
        return state

    @classmethod
    def unpack(cls, state):
        """The inverse of :meth:`pack`."""
        lists = {}
        for kind in _KINDS:
            offsets = state[kind + "_offsets"].tolist()
            values = state[kind + "_values"].tolist()
            lists[kind] = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return cls(**lists)


def token_neighbours(query, gallery, num_tokens, threshold=0.9, min_votes=None, chunk_size=1024):
    """For each query row, the gallery rows that at least `min_votes` of the `num_tokens`
    token slices select (module docstring); a list of int lists."""
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError("token_neighbours: query %s and gallery %s must be [N, K*W] with equal widths"
                         % (tuple(query.shape), tuple(gallery.shape)))
    if query.shape[1] % num_tokens:
        raise ValueError("token_neighbours: width %d is not a multiple of %d tokens" % (query.shape[1], num_tokens))
    votes_needed = num_tokens if min_votes is None else int(min_votes)
    width = query.shape[1] // num_tokens
    n_gallery = gallery.shape[0]
    neighbours = []
    for start in range(0, query.shape[0], chunk_size):
        rows = query[start:start + chunk_size]
        # small counters: a chunk of SYSU rows against every image stays at a few bytes per pair
        votes = torch.zeros(rows.shape[0], n_gallery, dtype=torch.int16, device=query.device)
        first = torch.full_like(votes, num_tokens)
        for t in range(num_tokens):
            cols = slice(t * width, (t + 1) * width)
            similarity = rows[:, cols].mm(gallery[:, cols].t())
            hit = similarity > threshold * similarity.max(dim=1, keepdim=True).values
            votes += hit
            first = torch.where(hit & (first == num_tokens), torch.full_like(first, t), first)
        kept = votes >= votes_needed
        row, col = torch.nonzero(kept, as_tuple=True)
        order = torch.argsort((row * (num_tokens + 1) + first[row, col].long()) * n_gallery + col)
        counts = kept.sum(dim=1).tolist()
        neighbours.extend(part.tolist() for part in torch.split(col[order].cpu(), counts))
    return neighbours


def dtnl_neighbour_sets(features_ir, features_rgb, num_tokens, threshold=0.9, min_votes=None, chunk_size=1024):
    """The four stage-2 lists from the L2-normalised features [N_ir, K*W] and [N_rgb, K*W]."""
    def select(query, gallery):
        return token_neighbours(query, gallery, num_tokens, threshold, min_votes, chunk_size)
    return NeighbourSets(ir=select(features_ir, features_ir), rgb=select(features_rgb, features_rgb),
                         i2r=select(features_ir, features_rgb), r2i=select(features_rgb, features_ir))


def camera_local_index(rows):
    """{file name: local label} from camera-local rows (file name, local label, camera)."""
    return {row[0]: row[1] for row in rows}


def _prune_list(neighbours, anchor_label, local, anchor_cam, gallery_files, gallery_cams, decay, rng,
                fix_prune_skip):
    """Prune one anchor's list in place; the number of neighbours removed."""
    removed, position = 0, 0
    while position < len(neighbours):
        node = neighbours[position]
        label = local.get(gallery_files[node], _ABSENT) if gallery_cams[node] == anchor_cam else _ABSENT
        if label is not _ABSENT and label != anchor_label and rng.random() <= decay:
            del neighbours[position]
            removed += 1
            if not fix_prune_skip:
                # the released scan removes from the list it iterates and moves on, so the
                # element that slides into this position is never examined
                position += 1
            continue
        position += 1
    return removed


def prune_by_camera(sets, files_ir, cams_ir, files_rgb, cams_rgb, camera_local, decay=1.0, rng=None,
                    fix_prune_skip=False):
    """Camera-aware pruning of `sets` (a :class:`NeighbourSets`, modified in place), with the
    images' file names and cameras in feature order; returns {kind: number removed}.

    ``camera_local``: camera -> {file name: local label} for every camera that has anchors;
    ``rng``: anything with ``random()`` (default: Python's global generator, as released).
    """
    rng = random if rng is None else rng
    removed = dict.fromkeys(_KINDS, 0)
    plan = ((files_ir, cams_ir, (("ir", files_ir, cams_ir), ("i2r", files_rgb, cams_rgb))),
            (files_rgb, cams_rgb, (("rgb", files_rgb, cams_rgb), ("r2i", files_ir, cams_ir))))
    for anchor_files, anchor_cams, lists in plan:
        for index, (fname, cam) in enumerate(zip(anchor_files, anchor_cams)):
            if cam not in camera_local:
                raise ValueError("camera-aware pruning: no camera-local clustering for camera %r" % (cam,))
            local = camera_local[cam]
            if fname not in local:
                continue
            for kind, gallery_files, gallery_cams in lists:
                removed[kind] += _prune_list(getattr(sets, kind)[index], local[fname], local, cam, gallery_files,
                                             gallery_cams, decay, rng, fix_prune_skip)
    return removed
