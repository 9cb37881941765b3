"""Mutual Fusion Unit: one summary vector attends to the token set of the other branch.

``MutualFusionUnit(dim, num_heads=12, mlp_ratio=4.0)(s [B, dim], Y [B, N, dim]) -> [B, dim]``,
a cross-attention block with a single query, heads of size d = dim / num_heads::

    q = W_q LN1(s)        k = W_k LN_k(Y)        v = W_v Y          (W_q, W_k, W_v without bias)
    A = softmax over the N tokens of (q . k) / sqrt(d), per head
    s' = s + W_p (A v) + b_p                                        (heads concatenated in order)
    out = s' + MLP(LN2(s'))            Linear(dim, 4 dim) -> GELU (erf) -> Linear(4 dim, dim)

The LayerNorm ``key_norm`` normalises the tokens for the keys only: the values are projected
from the raw tokens, as in the released model. Its bias shifts every key score of a head by the
same amount, which the softmax removes, so that bias never receives a gradient. Every LayerNorm
uses eps 1e-5; no dropout or stochastic depth; PyTorch's default Linear initialisation.
"""
from torch import nn

from utils.compat import timm  # noqa: F401  (registers timm after torchvision for the imports below)
from timm.layers import Mlp


class MutualFusionUnit(nn.Module):
    def __init__(self, dim=768, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError("MutualFusionUnit: dim %d is not a multiple of num_heads %d" % (dim, num_heads))
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.key_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, summary, tokens):
        b, n, c = tokens.shape
        h = self.num_heads
        q = self.query(self.norm1(summary)).reshape(b, h, 1, c // h)
        k = self.key(self.key_norm(tokens)).reshape(b, n, h, c // h).transpose(1, 2)
        v = self.value(tokens).reshape(b, n, h, c // h).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = summary + self.proj((attn @ v).reshape(b, c))
        return x + self.mlp(self.norm2(x))
