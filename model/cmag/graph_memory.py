"""CMAG's graph-structured memory: a kNN graph over the batch and a FIFO feature memory.

:class:`GraphMemoryEnhancement` maps a batch of features ``x`` [B, d] to enhanced features
[B, d] of the same shape. It keeps a ring buffer of the last M rows it was given in training
(``memory_features`` [M, d], ``memory_indices`` [M] int64 with their labels when labels are
passed, ``memory_ptr`` [1] int64 counting every row ever written; it is never wrapped, the slot
is ``ptr % M``). One call:

1. in train mode the batch is written first, row by row, detached: slot ``ptr % M`` gets row b,
   then ``ptr += 1``. The batch is therefore part of the memory it is compared with;
2. n = min(ptr, M); with fewer than 5 memory rows the input is returned as it is (the same
   tensor object);
3. X = cat(x, memory[:n]) [B + n, d] (in training every batch row is in X twice);
   E = node_encoder(X) [B + n, h]; S = E E^T, **not normalised**;
4. each node's neighbours are the columns 1..k of ``topk(S, min(k + 1, B + n))``: column 0 is
   assumed to be the node itself, which unnormalised dot products do not guarantee (another
   node can score higher and is then dropped while the node itself is kept), and a batch row
   ties exactly with its own copy in the memory, so which of the tied nodes is dropped, and
   which node fills the k-th place, follow ``torch.topk``'s tie order (train-mode results are
   reproducible only with the same topk: same device, dtype and layout);
5. A [B + n, B + n] = 1 on those neighbours, plus the identity, symmetrised (A + A^T) / 2 and
   divided by its row sums (+ 1e-8);
6. h = relu(gcn1(A E)); h = relu(gcn2(A h)); out = x + feature_mapper(h[:B]) with
   feature_mapper = Linear(h, d), ReLU, Linear(d, d).

No gradient flows through A (it is built from indices) or into the memory rows; the batch rows
receive gradients both directly and through the graph. ``edge_encoder`` (Linear(2h, h), ReLU,
Linear(h, 1)) is built and never used, and ``momentum`` and ``temperature`` are stored and
never read: the released module has them, and keeping them keeps its state-dict layout and
the order in which its layers draw their initial weights. The released module builds A in
the default dtype, so it runs only in the default dtype; here A follows the features' dtype
(float32 results are identical), so the module also runs in float64.

In CMAG's trainer one module is called on the RGB batch and then on the IR batch, without
labels, so its memory holds both modalities. The released training script that built it is
not public: ``hidden_dim`` and ``memory_size`` are unknown, and their defaults here (512 and
2048) are this project's choice.
"""
import torch
import torch.nn.functional as F
from torch import nn

MIN_MEMORY_ROWS = 5


class GraphMemoryEnhancement(nn.Module):
    """The graph memory (module docstring): ``feature_dim`` d, ``hidden_dim`` h, ``memory_size``
    M, ``num_neighbours`` k (10 as released); ``momentum`` and ``temperature`` are kept as the
    released signature has them and are unused. ``last_top1_not_self`` counts the nodes of the
    last graph whose top-1 was another node (monitoring)."""

    def __init__(self, feature_dim, hidden_dim=512, memory_size=2048, momentum=0.2, temperature=0.07,
                 num_neighbours=10):
        super().__init__()
        if min(feature_dim, hidden_dim, memory_size, num_neighbours) < 1:
            raise ValueError("GraphMemoryEnhancement needs positive sizes, got feature_dim=%r hidden_dim=%r "
                             "memory_size=%r num_neighbours=%r"
                             % (feature_dim, hidden_dim, memory_size, num_neighbours))
        self.feature_dim = int(feature_dim)
        self.hidden_dim = int(hidden_dim)
        self.memory_size = int(memory_size)
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.num_neighbours = int(num_neighbours)
        self.register_buffer("memory_features", torch.zeros(memory_size, feature_dim))
        self.register_buffer("memory_indices", torch.zeros(memory_size, dtype=torch.int64))
        self.register_buffer("memory_ptr", torch.zeros(1, dtype=torch.int64))
        self.node_encoder = nn.Linear(feature_dim, hidden_dim)
        self.edge_encoder = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.gcn1 = nn.Linear(hidden_dim, hidden_dim)
        self.gcn2 = nn.Linear(hidden_dim, hidden_dim)
        self.feature_mapper = nn.Sequential(nn.Linear(hidden_dim, feature_dim), nn.ReLU(),
                                            nn.Linear(feature_dim, feature_dim))
        self.last_top1_not_self = 0

    def extra_repr(self):
        return "feature_dim=%d, hidden_dim=%d, memory_size=%d, num_neighbours=%d" % (
            self.feature_dim, self.hidden_dim, self.memory_size, self.num_neighbours)

    def filled_rows(self):
        """How many memory rows hold features: min(rows written, M)."""
        return min(int(self.memory_ptr.item()), self.memory_size)

    def fill_level(self):
        """The filled fraction of the memory, a float in [0, 1] (for the training log)."""
        return self.filled_rows() / self.memory_size

    @torch.no_grad()
    def write(self, x, labels=None):
        """Append the rows of `x` [B, d] (and their `labels` [B]) to the FIFO, as in training."""
        ptr = int(self.memory_ptr.item())
        rows = x.detach()
        labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64, device=x.device)
        # a batch longer than the memory overwrites its own first rows: only the last M survive
        skip = max(0, len(rows) - self.memory_size)
        slots = (ptr + skip + torch.arange(len(rows) - skip, device=x.device)) % self.memory_size
        self.memory_features[slots] = rows[skip:].to(self.memory_features.dtype)
        if labels is not None:
            self.memory_indices[slots] = labels[skip:]
        self.memory_ptr += len(rows)

    def adjacency(self, embedded):
        """The normalised kNN adjacency [N, N] of node embeddings `embedded` [N, h] (steps 4-5)."""
        nodes = len(embedded)
        similarity = embedded.mm(embedded.t())
        order = similarity.topk(min(self.num_neighbours + 1, nodes), dim=1)[1]
        self.last_top1_not_self = int((order[:, 0] != torch.arange(nodes, device=order.device)).sum())
        adjacency = torch.zeros(nodes, nodes, dtype=embedded.dtype, device=embedded.device)
        adjacency.scatter_(1, order[:, 1:], 1.0)
        adjacency = adjacency + torch.eye(nodes, dtype=embedded.dtype, device=embedded.device)
        adjacency = (adjacency + adjacency.t()) / 2
        return adjacency / (adjacency.sum(dim=1, keepdim=True) + 1e-8)

    def forward(self, x, labels=None):
        """Enhanced features [B, d] of `x` [B, d] (module docstring); `labels` [B] are only stored."""
        if self.training:
            self.write(x, labels)
        filled = self.filled_rows()
        if filled < MIN_MEMORY_ROWS:
            return x
        nodes = torch.cat([x, self.memory_features[:filled].to(x.dtype)], dim=0)
        embedded = self.node_encoder(nodes)
        adjacency = self.adjacency(embedded.detach())
        hidden = F.relu(self.gcn1(adjacency.mm(embedded)))
        hidden = F.relu(self.gcn2(adjacency.mm(hidden)))
        return x + self.feature_mapper(hidden[:len(x)])
