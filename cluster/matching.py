"""Greedy cross-modal cluster matching with capacity, and the mixed memories built from it.

**Matching** (:func:`match_clusters`), on L2-normalised centroids [C_rgb, D] and [C_ir, D].
The side with more clusters gives the rows (RGB when C_rgb >= C_ir; the *mirror* branch puts
IR on the rows), the other side the columns; ``similarity = exp(rows @ columns.T)`` [R, C].

* Pass 1, until every row has a partner: (r, c) = the first maximum of ``cost`` in row-major
  order (``cost`` starts as the similarity). If column c has fewer than ``capacity``
  partners, r is matched to c (r is appended to c's list) and the whole row r is set to
  -1000; otherwise only cell (r, c) is.
* Pass 2, until every column has a partner: the same rule on a fresh copy of the similarity
  whose already-partnered columns are set to -1000 (rows are not masked, so a row matched in
  pass 1 can be taken again). Only the column lists grow; each row keeps its pass-1 partner.
  The partner counts are shared by both passes. A column that gets its partner here stays
  open, so pass 2 may fill it up to the capacity first and run out of rows before the other
  columns have one (the released loop then never ends; here :class:`MatchingError`).
  ``fix_second_pass=True`` closes each column as soon as pass 2 gives it a partner, so every
  column still without one gets exactly one and pass 2 always completes.

Both passes are bounded by R*C steps, as released. The result :class:`ClusterMatch` holds
``r2i`` and ``i2r`` as dicts in insertion order: in the regular branch ``r2i[rgb] = ir`` (int)
and ``i2r[ir] = [rgb, ...]`` (1..capacity labels); in the mirror branch ``i2r[ir] = rgb`` and
``r2i[rgb] = [ir, ...]``. This is not an optimal (Hungarian) assignment.

The released SYSU script has no mirror branch (with fewer RGB than IR clusters it stops with
an undefined name); ``allow_mirror=False`` reproduces that as a :class:`MatchingError`, and
``allow_mirror=True`` (the RegDB script, and the fix for SYSU) runs the mirror branch.

**Mixed memories** (:func:`mixed_centroids`, :func:`build_mixed_memories`) from the
unnormalised features of all images and their pseudo labels (-1 = outlier):

* mixed IR [C_ir, D]: normalised centroids of RGB + IR features with every RGB label
  replaced by its IR partner (``r2i[l]``, mirror ``r2i[l][0]``) and IR labels kept;
* mixed RGB [C_rgb, D]: the same with IR labels replaced by ``i2r[l][0]`` (mirror
  ``i2r[l]``) and RGB labels kept.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loss.cluster_memory import ClusterMemory
from loss.distances import identity_centres

_MASKED = -1000.0


class MatchingError(RuntimeError):
    """The clusters cannot be matched under the requested rules."""


@dataclass
class ClusterMatch:
    """RGB <-> IR cluster partners (module docstring); ``counts`` [C] float32 are the
    partner counts of the column side, ``similarity`` [R, C] the exp-cosine matrix."""

    r2i: dict
    i2r: dict
    mirror: bool
    counts: torch.Tensor
    similarity: torch.Tensor

    def rgb_to_ir(self, label):
        """The IR label an RGB cluster is mapped to (its first partner in the mirror branch)."""
        partner = self.r2i[label]
        return partner[0] if self.mirror else partner

    def ir_to_rgb(self, label):
        """The RGB label an IR cluster is mapped to (its first partner in the regular branch)."""
        partner = self.i2r[label]
        return partner if self.mirror else partner[0]

    def mates(self, label, ir_anchor):
        """The two clusters sharing `label`'s partner, or None when the partner has only one:
        for an RGB `label` (regular branch) ``i2r[r2i[label]]``; for an IR `label`
        (`ir_anchor`, mirror branch) ``r2i[i2r[label]]``."""
        group = self.r2i[self.i2r[label]] if ir_anchor else self.i2r[self.r2i[label]]
        return tuple(group) if len(group) == 2 else None

    def stats(self):
        """Monitoring numbers: clusters per side, columns with 2+ partners, pass-2 reuses."""
        rows, columns = (self.i2r, self.r2i) if self.mirror else (self.r2i, self.i2r)
        reused = sum(1 for c, members in columns.items() for r in members if rows[r] != c)
        return {"rgb_clusters": len(self.r2i), "ir_clusters": len(self.i2r), "mirror": self.mirror,
                "shared_columns": sum(1 for members in columns.values() if len(members) > 1),
                "second_pass_partners": reused}


def _greedy(similarity, capacity, fix_second_pass=False):
    """Both passes on [R, C] float32 numpy; (row -> col dict, col -> rows dict, counts)."""
    n_rows, n_cols = similarity.shape
    counts = np.zeros(n_cols, dtype=np.float32)
    row_to_col, col_to_rows = {}, {}

    def run(cost, done, assign_row, close_column=False):
        for _ in range(n_rows * n_cols):
            if done():
                return
            r, c = (int(v) for v in np.unravel_index(np.argmax(cost), cost.shape))
            if counts[c] < capacity:
                if assign_row:
                    row_to_col[r] = c
                col_to_rows.setdefault(c, []).append(r)
                counts[c] += 1
                cost[r, :] = _MASKED
                if close_column:
                    cost[:, c] = _MASKED
            else:
                cost[r, c] = _MASKED

    run(similarity.copy(), lambda: len(row_to_col) == n_rows, True)
    if len(row_to_col) != n_rows:
        raise MatchingError("cluster matching: %d clusters cannot be matched to %d clusters with capacity %d"
                            % (n_rows, n_cols, capacity))
    second = similarity.copy()
    second[:, counts != 0] = _MASKED
    run(second, lambda: len(col_to_rows) == n_cols, False, close_column=fix_second_pass)
    if len(col_to_rows) != n_cols:
        raise MatchingError("cluster matching: pass 2 filled the clusters it gave a partner up to the capacity %d "
                            "and ran out of the %d clusters of the other modality, leaving %d of %d without a "
                            "partner (the released loop never ends here)"
                            % (capacity, n_rows, n_cols - len(col_to_rows), n_cols))
    return row_to_col, col_to_rows, counts


def match_clusters(centroids_rgb, centroids_ir, capacity=2, allow_mirror=True, fix_second_pass=False):
    """Greedy matching of normalised centroids [C_rgb, D], [C_ir, D]; a :class:`ClusterMatch`
    (`fix_second_pass`: module docstring)."""
    if capacity < 1:
        raise ValueError("cluster matching: capacity must be >= 1, got %r" % (capacity,))
    mirror = centroids_rgb.shape[0] < centroids_ir.shape[0]
    if mirror and not allow_mirror:
        raise MatchingError("cluster matching: %d RGB clusters for %d IR clusters; the released SYSU recipe has "
                            "no branch for fewer RGB than IR clusters (enable the mirror-branch fix)"
                            % (centroids_rgb.shape[0], centroids_ir.shape[0]))
    rows, columns = (centroids_ir, centroids_rgb) if mirror else (centroids_rgb, centroids_ir)
    similarity = torch.mm(rows, columns.t()).exp().cpu()
    row_to_col, col_to_rows, counts = _greedy(similarity.numpy(), capacity, fix_second_pass)
    counts = torch.from_numpy(counts)
    if mirror:
        return ClusterMatch(r2i=col_to_rows, i2r=row_to_col, mirror=True, counts=counts, similarity=similarity)
    return ClusterMatch(r2i=row_to_col, i2r=col_to_rows, mirror=False, counts=counts, similarity=similarity)


def relabel(labels, mapping):
    """`labels` [N] int64 with every label l != -1 replaced by ``mapping(l)``."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    table = {int(l): mapping(int(l)) for l in torch.unique(labels).tolist() if l != -1}
    return torch.tensor([table.get(l, -1) for l in labels.tolist()], dtype=torch.int64)


def _normalised_centroids(features, labels, expected):
    keep = labels != -1
    centres, ids, _ = identity_centres(features[keep], labels[keep].to(features.device))
    if len(ids) != expected or not torch.equal(ids.cpu(), torch.arange(expected)):
        raise MatchingError("mixed memories: labels %s do not cover 0..%d" % (ids.tolist(), expected - 1))
    return F.normalize(centres, dim=1)


def mixed_centroids(features_rgb, features_ir, labels_rgb, labels_ir, match):
    """(mixed IR [C_ir, D], mixed RGB [C_rgb, D]), normalised, from the unnormalised features."""
    labels_rgb = torch.as_tensor(labels_rgb, dtype=torch.int64)
    labels_ir = torch.as_tensor(labels_ir, dtype=torch.int64)
    features = torch.cat([features_rgb, features_ir], dim=0)
    in_ir_space = torch.cat([relabel(labels_rgb, match.rgb_to_ir), labels_ir])
    in_rgb_space = torch.cat([labels_rgb, relabel(labels_ir, match.ir_to_rgb)])
    return (_normalised_centroids(features, in_ir_space, len(match.i2r)),
            _normalised_centroids(features, in_rgb_space, len(match.r2i)))


def build_mixed_memories(features_rgb, features_ir, labels_rgb, labels_ir, match, temp=0.05, momentum=0.8,
                         use_hard=False):
    """(mixed IR memory, mixed RGB memory) as :class:`ClusterMemory` with the given settings."""
    mixed_ir, mixed_rgb = mixed_centroids(features_rgb, features_ir, labels_rgb, labels_ir, match)
    settings = dict(temp=temp, momentum=momentum, use_hard=use_hard)
    return ClusterMemory.from_bank(mixed_ir, **settings), ClusterMemory.from_bank(mixed_rgb, **settings)
