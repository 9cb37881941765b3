"""Generalised-mean (GeM) pooling with one learnable exponent.

``GeM(p=3.0, eps=1e-6)``: [B, C, H, W] -> [B, C, 1, 1],

    GeM(x) = ( mean over the H x W map of clamp(x, min=eps) ** p ) ** (1 / p)

``p`` is a single learnable scalar (parameter of shape [1]) shared by all channels and trained
like any other weight. Entries at or below ``eps`` are clamped, so negative inputs contribute
``eps ** p`` and receive no gradient. p = 1 is average pooling; p -> infinity tends to max
pooling. Callers flatten the [B, C, 1, 1] result themselves.
"""
import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = float(eps)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("GeM expects a [B, C, H, W] map, got shape %s" % (tuple(x.shape),))
        powered = x.clamp(min=self.eps).pow(self.p)
        return F.avg_pool2d(powered, (x.size(-2), x.size(-1))).pow(1.0 / self.p)

    def extra_repr(self):
        return "p=%.4f, eps=%g" % (float(self.p.detach()[0]), self.eps)
