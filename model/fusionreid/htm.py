"""Heterogeneous Transmission Module: stacked layers that exchange summaries between branches.

``HTMLayer(dim, num_heads=12)(cnn_seq [B, 1 + Nc, dim], vit_seq [B, 1 + Nt, dim])
-> (a [B, dim], b [B, dim])``; each sequence is [summary token; tokens] of one branch::

    Xc = SEU_cnn(cnn_seq)       Xt = SEU_vit(vit_seq)              (two separate encoders)
    a  = MFU_cnn(Xc[:, 0], Xt[:, 1:])     the CNN summary reads the encoded ViT tokens
    b  = MFU_vit(Xt[:, 0], Xc[:, 1:])     the ViT summary reads the encoded CNN tokens

The encoded token sets are then dropped. ``HeterogeneousTransmissionModule(dim, depth=2)
(cnn_tokens [B, Nc, dim], vit_tokens [B, Nt, dim], a0 [B, dim], b0 [B, dim]) -> (a_L, b_L)``
runs ``depth`` layers; only the two summaries flow from one layer to the next, and **every layer
re-reads the original token sets** (the released design), i.e. layer l gets
[a_{l-1}; cnn_tokens] and [b_{l-1}; vit_tokens]. At 256x128, Nc = 128 (the 16 x 8 ResNet map)
and Nt = 210 (the 21 x 10 ViT grid). In the last layer the MLP output bias of each fusion unit
only shifts a feature that ends in a training-mode BatchNorm and a translation-invariant
triplet distance, so its loss gradient is exactly zero.
"""
import torch
from torch import nn

from model.fusionreid.mfu import MutualFusionUnit
from model.fusionreid.seu import SharedEncodingUnit


class HTMLayer(nn.Module):
    def __init__(self, dim=768, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        self.encode_cnn = SharedEncodingUnit(dim, num_heads, mlp_ratio)
        self.encode_vit = SharedEncodingUnit(dim, num_heads, mlp_ratio)
        self.fuse_cnn = MutualFusionUnit(dim, num_heads, mlp_ratio)
        self.fuse_vit = MutualFusionUnit(dim, num_heads, mlp_ratio)

    def forward(self, cnn_seq, vit_seq):
        cnn_seq = self.encode_cnn(cnn_seq)
        vit_seq = self.encode_vit(vit_seq)
        a = self.fuse_cnn(cnn_seq[:, 0], vit_seq[:, 1:])
        b = self.fuse_vit(vit_seq[:, 0], cnn_seq[:, 1:])
        return a, b


class HeterogeneousTransmissionModule(nn.Module):
    def __init__(self, dim=768, depth=2, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        if int(depth) < 1:
            raise ValueError("HeterogeneousTransmissionModule: depth must be >= 1, got %r" % (depth,))
        self.layers = nn.ModuleList(HTMLayer(dim, num_heads, mlp_ratio) for _ in range(int(depth)))

    def forward(self, cnn_tokens, vit_tokens, a, b):
        for layer in self.layers:
            a, b = layer(torch.cat([a.unsqueeze(1), cnn_tokens], dim=1), torch.cat([b.unsqueeze(1), vit_tokens], dim=1))
        return a, b
