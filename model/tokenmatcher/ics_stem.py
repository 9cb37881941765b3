"""The "ICS" convolutional stem of the TokenMatcher / CMAG encoder (one instance per modality).

For images [B, 3, H, W] and a stem of width w, patch size p and embedding width E:

=======  ==========================================================  =========================
``conv`` layer                                                        output
=======  ==========================================================  =========================
0        Conv2d 3 -> w, 7x7, stride 2, padding 3, no bias             [B, w, H', W'] (H' = ceil(H/2))
1        :class:`IBN` (w)                                             same
2        ReLU                                                         same
3        Conv2d w -> w, 3x3, stride 1, padding 1, no bias             same
4        :class:`IBN` (w)                                             same
5        ReLU                                                         same
6        Conv2d w -> w, 3x3, stride 1, padding 1, no bias             same
7        BatchNorm2d(w)                                               same
8        ReLU                                                         same
``proj`` Conv2d w -> E, kernel = stride = p/2, with bias              [B, E, gh, gw]
=======  ==========================================================  =========================

The output is flattened row-major over (gh, gw) into patch tokens [B, gh*gw, E]. The reference
sizes (w 64, p 16, E 768) at 384x128 give a 24 x 8 grid, 192 tokens. Every 16x16 input patch
is thus covered by one 8x8 projection of the half-resolution feature map, which is what lets
the stem stand in for a ViT's 16x16 patch embedding.

:class:`IBN` normalises the first half of its channels (``int(0.5 * w)``) with an affine
InstanceNorm2d (per-image statistics, in eval too: it keeps no running statistics) and the rest
with a BatchNorm2d, then concatenates the halves. The convolutions keep PyTorch's default
initialisation; every norm starts with weight 1 and bias 0 (PyTorch's default for both).
"""
import torch
from torch import nn

from model.backbones.pos_embed import patch_grid


class IBN(nn.Module):
    """InstanceNorm2d on the first half of the channels, BatchNorm2d on the rest: [B, C, h, w] -> same."""

    def __init__(self, channels):
        super().__init__()
        self.half = int(channels * 0.5)
        self.inorm = nn.InstanceNorm2d(self.half, affine=True)
        self.bnorm = nn.BatchNorm2d(channels - self.half)

    def forward(self, x):
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.inorm(first.contiguous()), self.bnorm(second.contiguous())], dim=1)


def stem_grid(img_size, patch_size):
    """(gh, gw): the patch-token grid of an :class:`ICSStem` for inputs of ``img_size`` (H, W)."""
    if int(patch_size) < 2 or int(patch_size) % 2:
        raise ValueError("the ICS stem needs an even patch size >= 2, got %r" % (patch_size,))
    half = [(int(s) + 2 * 3 - 7) // 2 + 1 for s in img_size]
    return patch_grid(half, int(patch_size) // 2, int(patch_size) // 2)


class ICSStem(nn.Module):
    """Images [B, 3, H, W] -> patch tokens [B, gh*gw, embed_dim] (module docstring)."""

    def __init__(self, width=64, embed_dim=768, patch_size=16, in_chans=3):
        super().__init__()
        stem_grid((patch_size, patch_size), patch_size)  # validates patch_size
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False),
            IBN(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False),
            IBN(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x):
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)
