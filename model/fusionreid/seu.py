"""Shared Encoding Unit: one pre-norm transformer block followed by a LayerNorm.

``SharedEncodingUnit(dim, num_heads=12, mlp_ratio=4.0)``: [B, N, dim] -> [B, N, dim]::

    X = X + MHSA(LN1(X))          12 heads of dim / 12, softmax over the N tokens
    X = X + MLP(LN2(X))           Linear(dim, 4 dim) -> GELU (erf) -> Linear(4 dim, dim)
    out = LN(X)

In FusionReID's fusion stack the input is [summary token; refined tokens] of one branch:
[B, 1 + 128, 768] on the ResNet side, [B, 1 + 210, 768] on the ViT side at 256x128. Unlike the
ViT backbone's blocks, the query/key/value projection has **no bias** (the output projection and
the MLP keep theirs), every LayerNorm uses eps 1e-5, there is no stochastic depth and the Linear
layers keep PyTorch's default initialisation. The block is timm's ``Block`` with exactly these
settings (``block``), so its parameter names are timm's (``block.attn.qkv.weight``, ...).
"""
from torch import nn

from utils.compat import timm  # noqa: F401  (registers timm after torchvision for the imports below)
from timm.models.vision_transformer import Block


class SharedEncodingUnit(nn.Module):
    def __init__(self, dim=768, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError("SharedEncodingUnit: dim %d is not a multiple of num_heads %d" % (dim, num_heads))
        self.block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.block(x))
