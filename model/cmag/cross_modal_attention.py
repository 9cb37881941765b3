"""``cma_reconstructed``: a reconstruction of CMAG's cross-modal attention, not the authors' module.

CMAG's trainer calls a cross-modal attention module as ``cma(query [B_q, D], context [B_c, D])``
on the pooled, BN'd batch features of one modality (query) and the other (context), in both
directions with the same module, and feeds the result, shaped like the query, into the memory
losses. The module itself is in none of the released artifacts. What is known: its call, its
output shape, that it sits after the encoder, and the authors' description ("cross-modal
attention with residual fusion to balance modality-specific and shared information"). Every
design choice below is this project's, chosen so that training starts exactly as TokenMatcher's:

    q = W_q LN(F_q);  k = W_k LN(F_c);  v = W_v LN(F_c)
    A = softmax(q k^T / sqrt(d_h)) over the B_c context rows, per head
    F_q' = F_q + gate * W_o(A v)

with ``gate`` a learnable scalar (initialised at ``gate_init``, 0 by default, so the module
starts as the identity). Two layouts:

* ``"token"`` (default): the D = K * C features are K tokens of C channels (token i in columns
  [i*C, (i+1)*C), as the encoder concatenates them); token i of a query row attends to token i
  of the context rows, H heads of C / H channels per token, with projections and LayerNorm
  shared by the tokens. This keeps the K-token structure the neighbour sets rely on;
* ``"vector"``: the whole D-vector attends, H heads of D / H channels.

All parameters (LayerNorm, four projections, gate) are trainable and belong in the optimiser.
None of this changes evaluation, where the module is not used.
"""
import math

import torch
from torch import nn

MODES = ("token", "vector")
NAME = "cma_reconstructed"


class CrossModalAttention(nn.Module):
    """Gated residual multi-head cross-attention over batch rows (module docstring).

    ``feature_dim`` D, ``num_tokens`` K (token mode: D must be a multiple of K), ``mode``
    "token" | "vector", ``num_heads`` H (must divide the attended width), ``gate_init``."""

    name = NAME

    def __init__(self, feature_dim, num_tokens=1, mode="token", num_heads=8, gate_init=0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError("%s mode must be one of %s, got %r" % (NAME, ", ".join(MODES), mode))
        num_tokens = int(num_tokens) if mode == "token" else 1
        if num_tokens < 1 or feature_dim % num_tokens:
            raise ValueError("%s: feature_dim %d is not a multiple of num_tokens %d" % (NAME, feature_dim, num_tokens))
        width = feature_dim // num_tokens
        if num_heads < 1 or width % num_heads:
            raise ValueError("%s: num_heads %d does not divide the attended width %d" % (NAME, num_heads, width))
        self.feature_dim = int(feature_dim)
        self.mode = mode
        self.num_tokens = num_tokens
        self.num_heads = int(num_heads)
        self.width = width
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def extra_repr(self):
        return "%s (a reconstruction, not the authors' module): feature_dim=%d, mode=%s, tokens=%d, heads=%d" % (
            NAME, self.feature_dim, self.mode, self.num_tokens, self.num_heads)

    def describe(self):
        """One line for logs and result files that says what this module is."""
        layout = ("per token (%d tokens of %d channels)" % (self.num_tokens, self.width) if self.mode == "token"
                  else "on the whole %d-d vector" % self.feature_dim)
        return ("%s: this project's reconstruction of CMAG's cross-modal attention (the authors' module is not "
                "public): gated residual cross-attention over the other modality's batch rows, %s, %d heads, "
                "gate %.6g" % (NAME, layout, self.num_heads, self.gate_value()))

    def gate_value(self):
        """The residual gate as a plain float (for the training log)."""
        return float(self.gate.detach())

    def _heads(self, x):
        # [B, K * C] -> [K, H, B, C / H]
        rows = x.shape[0]
        return x.reshape(rows, self.num_tokens, self.num_heads, self.width // self.num_heads).permute(1, 2, 0, 3)

    def forward(self, query, context):
        """[B_q, D] query rows attended over [B_c, D] context rows: [B_q, D]."""
        if query.dim() != 2 or context.dim() != 2 or query.shape[1] != self.feature_dim \
                or context.shape[1] != self.feature_dim:
            raise ValueError("%s expects query and context [B, %d], got %s and %s"
                             % (NAME, self.feature_dim, tuple(query.shape), tuple(context.shape)))
        rows = query.shape[0]
        q_in = self.norm(query.reshape(rows, self.num_tokens, self.width))
        c_in = self.norm(context.reshape(context.shape[0], self.num_tokens, self.width))
        q = self._heads(self.query(q_in).reshape(rows, -1))
        k = self._heads(self.key(c_in).reshape(context.shape[0], -1))
        v = self._heads(self.value(c_in).reshape(context.shape[0], -1))
        attention = torch.softmax(q.matmul(k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        mixed = attention.matmul(v).permute(2, 0, 1, 3).reshape(rows, self.num_tokens, self.width)
        return query + self.gate * self.out(mixed).reshape(rows, self.feature_dim)
