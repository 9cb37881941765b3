"""Cluster-contrast memory: a bank of L2-normalised prototypes [C, D] with an InfoNCE loss.

:class:`ClusterMemory` holds the buffer ``features`` [C, D] (cluster centroids, or one row per
training image for the neighbour loss) and has two losses:

* **cluster mode**, ``memory(inputs [B, D], targets [B])``::

      x = normalize(inputs);  loss = CE(x @ features.T / temp, targets)      (mean over B)

  The logits come from a custom autograd function whose backward first computes
  ``grad_x = grad_logits @ features`` with the bank **as it is when the backward runs**, and
  then moves the bank towards the batch, sample by sample in batch order::

      features[t_b] <- normalize(m * features[t_b] + (1 - m) * x_b)

  (m is rounded to float32 and 1 - m is computed in float32 whatever the bank's dtype, as
  the released code keeps the momentum in a float32 tensor), so a label that occurs several
  times in the batch is updated several times in a row. When
  one memory is called twice inside one loss, autograd runs the later call's backward first;
  its update is therefore visible to the earlier call's gradient. The normalisation of the
  inputs sits outside the function and is differentiated by autograd. With ``use_hard`` each
  target is updated once instead, by the batch sample least similar to its current centroid
  (first one on ties).

* **neighbour mode**, ``memory.neighbour_loss(inputs [B, D], targets)`` with ``targets`` a
  list of B lists of bank rows (ragged, possibly empty)::

      loss = sum_b sum_{j in targets[b]} CE(normalize(x_b) @ features.T / temp, j) / #pairs

  a mean over (sample, neighbour) pairs, computed with one log-sum-exp per row. The bank gets
  neither an update nor a gradient. When every list is empty it returns the Python float 0.0
  (not a tensor), which adds to tensors like a zero.

Both losses run in the bank's dtype (float32 or float64) with autocast disabled. The bank is a
buffer, so ``state_dict()`` / ``load_state_dict()`` checkpoint and restore it bitwise;
:meth:`ClusterMemory.from_bank` rebuilds a memory of the right size from a stored bank.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _BankLogits(torch.autograd.Function):
    """logits = x @ bank.T; backward uses the current bank, then updates it (module docstring)."""

    @staticmethod
    def forward(ctx, x, targets, memory):
        ctx.memory = memory
        ctx.save_for_backward(x, targets)
        return x.mm(memory.features.t())

    @staticmethod
    def backward(ctx, grad_logits):
        x, targets = ctx.saved_tensors
        memory = ctx.memory
        grad_x = grad_logits.mm(memory.features) if ctx.needs_input_grad[0] else None
        memory.update(x, targets)
        return grad_x, None, None


def _occurrence_rank(targets):
    """For each entry, how many earlier entries hold the same label: [B] int64."""
    sorted_targets, order = torch.sort(targets, stable=True)
    _, counts = torch.unique_consecutive(sorted_targets, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(len(targets), device=targets.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


class ClusterMemory(nn.Module):
    """A momentum-updated prototype bank with the cluster and neighbour InfoNCE losses.

    ``num_features`` D, ``num_samples`` C (rows), ``temp`` the softmax temperature,
    ``momentum`` m of the update, ``use_hard`` the hardest-sample update. ``gather``, if
    given, maps a tensor of this process's batch rows to the rows of every process in a
    fixed order (an all-gather on its own process group); the bank is then updated with the
    gathered batch so that all processes keep identical banks. See the module docstring.
    """

    def __init__(self, num_features, num_samples, temp=0.05, momentum=0.2, use_hard=False, gather=None,
                 dtype=torch.float32):
        super().__init__()
        if num_samples < 1 or num_features < 1:
            raise ValueError("ClusterMemory needs at least one row and one feature, got %d x %d"
                             % (num_samples, num_features))
        self.num_features = int(num_features)
        self.num_samples = int(num_samples)
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.use_hard = bool(use_hard)
        self.gather = gather
        self.register_buffer("features", torch.zeros(num_samples, num_features, dtype=dtype))

    @classmethod
    def from_bank(cls, bank, **kwargs):
        """A memory whose bank is a copy of `bank` [C, D] (its dtype and device kept)."""
        memory = cls(bank.shape[1], bank.shape[0], dtype=bank.dtype, **kwargs).to(bank.device)
        memory.features.copy_(bank)
        return memory

    def extra_repr(self):
        return "num_samples=%d, num_features=%d, temp=%g, momentum=%g, use_hard=%s" % (
            self.num_samples, self.num_features, self.temp, self.momentum, self.use_hard)

    def _normalized(self, inputs):
        return F.normalize(inputs.to(self.features.dtype), dim=1)

    def forward(self, inputs, targets):
        """Cluster-mode loss of `inputs` [B, D] against labels `targets` [B]; 0-d tensor."""
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            targets = torch.as_tensor(targets, dtype=torch.int64, device=inputs.device)
            logits = _BankLogits.apply(self._normalized(inputs), targets, self)
            return F.cross_entropy(logits / self.temp, targets)

    def neighbour_loss(self, inputs, targets):
        """Neighbour-mode loss of `inputs` [B, D] against the bank rows listed in `targets`
        (B lists of ints); 0-d tensor, or the float 0.0 when there is no pair at all."""
        if len(targets) != len(inputs):
            raise ValueError("neighbour_loss: %d rows but %d target lists" % (len(inputs), len(targets)))
        rows = [b for b, row in enumerate(targets) for _ in row]
        if not rows:
            return 0.0
        cols = [int(j) for row in targets for j in row]
        device = inputs.device
        with torch.autocast(device_type=device.type, enabled=False):
            used, pair_row = torch.unique(torch.tensor(rows, device=device), return_inverse=True)
            logits = self._normalized(inputs[used]).mm(self.features.t()) / self.temp
            per_row = torch.logsumexp(logits, dim=1)
            picked = logits[pair_row, torch.tensor(cols, device=device)]
            return (per_row[pair_row].sum() - picked.sum()) / len(cols)

    @torch.no_grad()
    def update(self, x, targets):
        """Move the bank towards the normalised rows `x` [B, D] with labels `targets` [B]."""
        if self.gather is not None:
            x, targets = self.gather(x), self.gather(targets)
        if len(targets) == 0:
            return
        x = x.to(self.features.dtype)
        if self.use_hard:
            chosen_labels, chosen_rows = self._hardest(x, targets)
            self._blend(chosen_labels, x[chosen_rows])
            return
        # labels are independent and each label's updates are sequential: one round per
        # occurrence rank reproduces the sample-by-sample order exactly
        rank = _occurrence_rank(targets)
        for r in range(int(rank.max()) + 1):
            rows = torch.nonzero(rank == r).squeeze(1)
            self._blend(targets[rows], x[rows])

    def _blend(self, labels, rows):
        bank = self.features
        # the momentum is a float32 number and 1 - m is rounded in float32, whatever the bank's dtype
        keep = torch.tensor(self.momentum, dtype=torch.float32)
        mixed = bank[labels] * keep.item() + (1.0 - keep).item() * rows
        bank[labels] = mixed / mixed.norm(dim=1, keepdim=True)

    def _hardest(self, x, targets):
        """(labels, row of each label's least similar sample); first occurrence on ties."""
        similarity = (x * self.features[targets]).sum(dim=1)
        by_similarity = torch.argsort(similarity, stable=True)
        by_label = by_similarity[torch.argsort(targets[by_similarity], stable=True)]
        sorted_labels = targets[by_label]
        first = torch.ones_like(sorted_labels, dtype=torch.bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        return sorted_labels[first], by_label[first]
