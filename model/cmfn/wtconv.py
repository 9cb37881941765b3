"""WTConv2d: a depthwise 3x3 conv plus the same conv in the 1-level Haar wavelet domain
(WTConv with wt_levels=1, wt_type='db1', stride 1, no bias, as CSC-CMA builds it).

x [B, C, H, W] -> [B, C, H, W]:

1. odd H or W: zero-pad one row/column at the bottom/right;
2. Haar analysis: grouped stride-2 conv with the four 2x2 Haar kernels per channel ->
   [B, 4C, H/2, W/2], channel-major (the sub-bands of channel c at 4c .. 4c+3, order
   LL, LH, HL, HH);
3. depthwise 3x3 conv (4C groups, 'same', no bias) times a learnable scale [1, 4C, 1, 1]
   (init 0.1);
4. Haar synthesis (grouped stride-2 transposed conv with the same kernels; the orthonormal
   Haar bank is its own inverse), cropped back to H x W;
5. plus the base path: depthwise 3x3 conv of x ('same', no bias) times a learnable scale
   [1, C, 1, 1] (init 1).

The Haar kernels are fixed constants, hard-coded here (no pywavelets) and kept in a
non-persistent buffer: they are not parameters and not saved. Each entry is ±(1/√2)² computed
in float32 (0.49999997), the exact value the released filters hold. Trainable parameters at
C=256: 12,800 (the released module also lists 8,192 frozen filter elements as parameters).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers import ConversionError, rename_state_dict

# Row/column sign patterns of the 2x2 Haar kernels LL, LH, HL, HH (released band order).
_HAAR_SIGNS = ((( 1,  1), ( 1,  1)),
               (( 1,  1), (-1, -1)),
               (( 1, -1), ( 1, -1)),
               (( 1, -1), (-1,  1)))


def haar_filters(channels):
    """[4 * channels, 1, 2, 2] float32 analysis (= synthesis) bank, band-minor order."""
    tap = torch.tensor(0.5 ** 0.5, dtype=torch.float32)
    bank = torch.tensor(_HAAR_SIGNS, dtype=torch.float32) * (tap * tap)
    return bank.unsqueeze(1).repeat(channels, 1, 1, 1)


class WTConv2d(nn.Module):
    def __init__(self, channels, kernel_size=3):
        super().__init__()
        self.channels = channels
        self.base_conv = nn.Conv2d(channels, channels, kernel_size, padding="same",
                                   groups=channels, bias=False)
        self.base_scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.wavelet_conv = nn.Conv2d(4 * channels, 4 * channels, kernel_size, padding="same",
                                      groups=4 * channels, bias=False)
        self.wavelet_scale = nn.Parameter(torch.full((1, 4 * channels, 1, 1), 0.1))
        self.register_buffer("haar", haar_filters(channels), persistent=False)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x_even = F.pad(x, (0, w % 2, 0, h % 2))
        else:
            x_even = x
        haar = self.haar.to(x.dtype)
        bands = F.conv2d(x_even, haar, stride=2, groups=self.channels)
        bands = self.wavelet_conv(bands) * self.wavelet_scale
        wavelet = F.conv_transpose2d(bands, haar, stride=2, groups=self.channels)[..., :h, :w]
        return self.base_conv(x) * self.base_scale + wavelet


def convert_released_state_dict(sd):
    """Released WTConv2d keys -> this module's keys.

    ``base_scale.weight`` / ``wavelet_scale.0.weight`` -> ``base_scale`` / ``wavelet_scale``,
    ``wavelet_convs.0`` -> ``wavelet_conv``. The fixed ``wt_filter`` / ``iwt_filter`` are
    checked against the Haar bank and dropped (ours is a constant buffer).
    """
    for key in ("wt_filter", "iwt_filter"):
        if key in sd:
            filt = sd[key]
            expected = haar_filters(filt.shape[0] // 4)
            if filt.shape != expected.shape or not torch.allclose(
                    filt.detach().cpu().float(), expected, atol=1e-6):
                raise ConversionError(
                    "WTConv2d", key, f"{tuple(filt.shape)} is not the 1-level Haar (db1) bank "
                    f"{tuple(expected.shape)} this implementation hard-codes")
    rules = [("base_conv.", "base_conv."), ("base_scale.weight", "base_scale"),
             ("wavelet_convs.0.", "wavelet_conv."), ("wavelet_scale.0.weight", "wavelet_scale")]
    return rename_state_dict(sd, rules, "WTConv2d", drop=("wt_filter", "iwt_filter"))
