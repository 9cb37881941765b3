"""CMAG's "circular" path: a graph memory with 3-cycle convolutions and a loop-based contrastive loss.

The released trainer can replace the graph memory by :class:`CircularGraphMemory` and add
``lambda_graph * circular loss``. As compiled, neither can train, and both are kept here in
that form (``variant="as_compiled"``, :func:`circular_contrastive_loss`), next to a working
variant that keeps the idea (``variant="fixed"``, :func:`circular_contrastive_loss_fixed`).

**Loop edges** (:func:`loop_edges`), shared by both losses. For features [B, d] (normalised
inside, S = f f^T) and labels [B]: each row i takes its k = min(10, B - 1) nearest others
(columns 1..k of ``topk(S, k + 1)``), keeps those with its own label, p_1..p_m in descending
similarity, and if m >= 2 marks C[i, p_j] (j < m), the chain C[p_j, p_{j+1}] and the closing
edge C[p_m, p_1]: a loop through i's same-label neighbours. C [B, B] accumulates over rows.

**As-compiled loss** (:func:`circular_contrastive_loss`): W = same_label + 0.5 C,
P = exp(S / T) W, den_i = sum_{j != i} P_ij, and the mean over pairs with same_label * C = 1
of -log(P_ij / (den_i + 1e-12)), with log evaluated on every pair and then masked. Pairs of
different labels have weight 0, so there are no negatives, and log(0) * 0 is NaN: with two or
more labels in the batch (always, in training) the loss and its gradient are NaN. With a
single label it is finite (and without any loop pair it is 0 / 0, NaN as well).

**Fixed loss** (:func:`circular_contrastive_loss_fixed`): every other sample is in the
denominator (negatives weight 1, same-label pairs 1, loop pairs 1 + 0.5), computed in log space
(a log-sum-exp per row, the log taken only on loop pairs). With one label it equals the
as-compiled value. Without any loop pair it is a zero that keeps the graph.

**CircularGraphConv** (in -> out, on nodes x [N, in] and adjacency A [N, N]):
``norm(combine(cat(regular(A x), circular(C x))))`` with C = A^3 * A (on each edge, the number
of 3-step walks between its ends, larger for edges on triangles) divided by its row sums
(+ 1e-8); ``norm`` a LayerNorm.

**CircularGraphMemory** (d, h, M), called as ``memory(x_rgb [B_r, d], x_ir [B_i, d], y_rgb,
y_ir)`` -> (x_rgb', x_ir'), with a ring buffer ``memory_features`` [M, d] and ``memory_ptr``:

* ``as_compiled``: in train mode the batch cat(x_rgb, x_ir) is first written in a
  ``torch.randperm`` order at slots (ptr + i) % M while ptr is also incremented, so it lands
  in every other slot; with fewer than 10 memory rows the inputs are returned; otherwise the
  kNN graph over cat(x_rgb, x_ir, memory) [B + n nodes] is multiplied by the label mask
  eq(y, y^T) of the B batch rows only, which raises a RuntimeError (a shape mismatch) as soon
  as the memory holds any row; that mask also compares RGB with IR pseudo labels, which live in
  different label spaces. With a non-empty memory this variant therefore always fails, and the
  propagation after the mask (here the fixed variant's) is never reached.
* ``fixed``: the graph is built before the batch is written (so no batch row meets its own
  copy), from the current batch and every filled memory row; each node's k nearest other nodes
  (the node itself excluded explicitly) are joined, and an edge between two batch rows of the
  same modality is cut when their labels differ (other pairs have no comparable labels);
  A = (A + I + (A + I)^T) / 2, row-normalised. Then h = relu(conv1(E, A)),
  h = relu(conv2(h, A)), out = x + feature_mapper(h[:B]); finally the batch is written to
  consecutive slots.

Both variants share the layers: ``node_encoder`` Linear(d, h), ``conv1`` / ``conv2``
CircularGraphConv(h, h), ``feature_mapper`` Linear(h, d), ReLU, Linear(d, d).
"""
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("as_compiled", "fixed")
AS_COMPILED_MIN_ROWS = 10


def loop_edges(similarity, labels, max_neighbours=10):
    """The loop matrix C [B, B] (module docstring) of a similarity [B, B] and labels [B]."""
    batch = len(labels)
    loops = torch.zeros(batch, batch, dtype=similarity.dtype, device=similarity.device)
    k = min(max_neighbours, batch - 1)
    if k < 2:
        return loops
    neighbours = similarity.topk(k + 1, dim=1)[1][:, 1:].tolist()
    label_list = labels.tolist()
    rows, cols = [], []
    for i, candidates in enumerate(neighbours):
        same = [j for j in candidates if label_list[j] == label_list[i]]
        if len(same) < 2:
            continue
        rows += [i] * (len(same) - 1) + same
        cols += same[:-1] + same[1:] + same[:1]
    if rows:
        loops[torch.tensor(rows, device=loops.device), torch.tensor(cols, device=loops.device)] = 1.0
    return loops


def _normalised_similarity(features, labels):
    labels = torch.as_tensor(labels, dtype=torch.int64, device=features.device)
    normalised = F.normalize(features, dim=1)
    return normalised.mm(normalised.t()), labels


def circular_contrastive_loss(features, labels, temperature=0.07):
    """The released loss of `features` [B, d] with `labels` [B]: 0-d, NaN with 2+ labels (module docstring)."""
    similarity, labels = _normalised_similarity(features, labels)
    same_label = labels[:, None].eq(labels[None, :]).to(features.dtype)
    loops = loop_edges(similarity.detach(), labels)
    weighted = torch.exp(similarity / temperature) * (same_label + 0.5 * loops)
    off_diagonal = 1.0 - torch.eye(len(labels), dtype=features.dtype, device=features.device)
    denominator = (weighted * off_diagonal).sum(dim=1, keepdim=True)
    selected = same_label * loops
    log_ratio = torch.log(weighted / (denominator + 1e-12))
    return -(log_ratio * selected).sum() / selected.sum()


def circular_contrastive_loss_fixed(features, labels, temperature=0.07, loop_weight=0.5):
    """The working variant of `features` [B, d] with `labels` [B]: 0-d, finite (module docstring)."""
    similarity, labels = _normalised_similarity(features, labels)
    loops = loop_edges(similarity.detach(), labels)
    rows, cols = torch.nonzero(loops, as_tuple=True)
    if len(rows) == 0:
        return similarity.sum() * 0.0
    logits = similarity / temperature + torch.log1p(loop_weight * loops)
    eye = torch.eye(len(labels), dtype=torch.bool, device=features.device)
    log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return (log_denominator[rows] - logits[rows, cols]).mean()


class CircularGraphConv(nn.Module):
    """Regular and 3-cycle graph convolutions, combined and layer-normalised (module docstring)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.regular = nn.Linear(in_dim, out_dim)
        self.circular = nn.Linear(in_dim, out_dim)
        self.combine = nn.Linear(2 * out_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    @staticmethod
    def cycle_adjacency(adjacency):
        """(A^3 * A) divided by its row sums (+ 1e-8): [N, N]."""
        cycles = adjacency.mm(adjacency).mm(adjacency) * adjacency
        return cycles / (cycles.sum(dim=1, keepdim=True) + 1e-8)

    def forward(self, x, adjacency, cycles=None):
        """[N, out] of nodes `x` [N, in] on `adjacency` [N, N]; `cycles` is
        :meth:`cycle_adjacency` of it when already computed."""
        cycles = self.cycle_adjacency(adjacency) if cycles is None else cycles
        regular = self.regular(adjacency.mm(x))
        circular = self.circular(cycles.mm(x))
        return self.norm(self.combine(torch.cat([regular, circular], dim=1)))


class CircularGraphMemory(nn.Module):
    """The circular graph memory (module docstring); ``variant`` "as_compiled" (the released
    behaviour, which cannot train) or "fixed"."""

    def __init__(self, feature_dim, hidden_dim=512, memory_size=2048, num_neighbours=10, variant="as_compiled"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError("CircularGraphMemory variant must be one of %s, got %r" % (", ".join(VARIANTS), variant))
        if min(feature_dim, hidden_dim, memory_size, num_neighbours) < 1:
            raise ValueError("CircularGraphMemory needs positive sizes, got feature_dim=%r hidden_dim=%r "
                             "memory_size=%r num_neighbours=%r"
                             % (feature_dim, hidden_dim, memory_size, num_neighbours))
        self.feature_dim = int(feature_dim)
        self.hidden_dim = int(hidden_dim)
        self.memory_size = int(memory_size)
        self.num_neighbours = int(num_neighbours)
        self.variant = variant
        self.register_buffer("memory_features", torch.zeros(memory_size, feature_dim))
        self.register_buffer("memory_ptr", torch.zeros(1, dtype=torch.int64))
        self.node_encoder = nn.Linear(feature_dim, hidden_dim)
        self.conv1 = CircularGraphConv(hidden_dim, hidden_dim)
        self.conv2 = CircularGraphConv(hidden_dim, hidden_dim)
        self.feature_mapper = nn.Sequential(nn.Linear(hidden_dim, feature_dim), nn.ReLU(),
                                            nn.Linear(feature_dim, feature_dim))

    def extra_repr(self):
        return "feature_dim=%d, hidden_dim=%d, memory_size=%d, num_neighbours=%d, variant=%s" % (
            self.feature_dim, self.hidden_dim, self.memory_size, self.num_neighbours, self.variant)

    def filled_rows(self):
        """How many memory rows hold features: min(ptr, M)."""
        return min(int(self.memory_ptr.item()), self.memory_size)

    def fill_level(self):
        """The filled fraction of the memory, a float in [0, 1] (for the training log)."""
        return self.filled_rows() / self.memory_size

    @torch.no_grad()
    def _write_strided(self, rows):
        # the released update advances the slot by i and the pointer by 1 per row: stride 2
        order = torch.randperm(len(rows)).to(rows.device)
        for i, row in enumerate(order.tolist()):
            self.memory_features[(int(self.memory_ptr.item()) + i) % self.memory_size] = rows[row]
            self.memory_ptr += 1

    @torch.no_grad()
    def _write_consecutive(self, rows):
        skip = max(0, len(rows) - self.memory_size)
        slots = (int(self.memory_ptr.item()) + skip + torch.arange(len(rows) - skip, device=rows.device))
        self.memory_features[slots % self.memory_size] = rows[skip:].to(self.memory_features.dtype)
        self.memory_ptr += len(rows)

    def _knn(self, embedded, exclude_self):
        nodes = len(embedded)
        similarity = embedded.mm(embedded.t())
        if exclude_self:
            similarity = similarity.masked_fill(torch.eye(nodes, dtype=torch.bool, device=similarity.device),
                                                float("-inf"))
            neighbours = similarity.topk(min(self.num_neighbours, nodes - 1), dim=1)[1]
        else:
            neighbours = similarity.topk(min(self.num_neighbours + 1, nodes), dim=1)[1][:, 1:]
        adjacency = torch.zeros(nodes, nodes, dtype=embedded.dtype, device=embedded.device)
        return adjacency.scatter_(1, neighbours, 1.0)

    def _propagate(self, x, embedded, adjacency):
        adjacency = adjacency + torch.eye(len(embedded), dtype=embedded.dtype, device=embedded.device)
        adjacency = (adjacency + adjacency.t()) / 2
        adjacency = adjacency / (adjacency.sum(dim=1, keepdim=True) + 1e-8)
        cycles = CircularGraphConv.cycle_adjacency(adjacency)
        hidden = F.relu(self.conv1(embedded, adjacency, cycles))
        hidden = F.relu(self.conv2(hidden, adjacency, cycles))
        return x + self.feature_mapper(hidden[:len(x)])

    def forward(self, x_rgb, x_ir, labels_rgb, labels_ir):
        batch = torch.cat([x_rgb, x_ir], dim=0)
        labels = torch.cat([torch.as_tensor(labels_rgb, dtype=torch.int64, device=batch.device),
                            torch.as_tensor(labels_ir, dtype=torch.int64, device=batch.device)])
        if self.variant == "as_compiled":
            out = self._forward_as_compiled(batch, labels)
        else:
            out = self._forward_fixed(batch, labels, len(x_rgb))
        return out[:len(x_rgb)], out[len(x_rgb):]

    def _forward_as_compiled(self, batch, labels):
        if self.training:
            self._write_strided(batch.detach())
        filled = self.filled_rows()
        if filled < AS_COMPILED_MIN_ROWS:
            return batch
        nodes = torch.cat([batch, self.memory_features[:filled].to(batch.dtype)], dim=0)
        embedded = self.node_encoder(nodes)
        adjacency = self._knn(embedded.detach(), exclude_self=False)
        # [B + n, B + n] times [B, B]: the released shape error whenever the memory has rows
        adjacency = adjacency * labels[:, None].eq(labels[None, :]).to(adjacency.dtype)
        return self._propagate(batch, embedded, adjacency)

    def _forward_fixed(self, batch, labels, num_rgb):
        filled = self.filled_rows()
        nodes = torch.cat([batch, self.memory_features[:filled].to(batch.dtype)], dim=0)
        if len(nodes) < 2:
            return batch
        embedded = self.node_encoder(nodes)
        adjacency = self._knn(embedded.detach(), exclude_self=True)
        modality = torch.arange(len(batch), device=batch.device) >= num_rgb
        conflict = (modality[:, None] == modality[None, :]) & (labels[:, None] != labels[None, :])
        adjacency[:len(batch), :len(batch)] = adjacency[:len(batch), :len(batch)].masked_fill(conflict, 0.0)
        out = self._propagate(batch, embedded, adjacency)
        if self.training:
            self._write_consecutive(batch.detach())
        return out
