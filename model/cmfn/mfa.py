"""MFA, the multi-scale feature aggregation block kept from DEEN (docs/cmfn.md).

MFA(high_ch, low_ch, downsample) fuses the main-path tensor x_main [B, high_ch, Hh, Wh]
(a ResNet stage output) with the side tensor x_side [B, low_ch, Hl, Wl] (HCE or dilated
bottleneck output): z = PositionNonLocal(ChannelNonLocal(x_main, x_side), x_side), shape
[B, high_ch, Hh, Wh]. With ``downsample`` (released flag 1) Hl = 2 Hh and Wl = 2 Wh; without
it the sizes are equal.

Both parts end in a 1x1 conv + BatchNorm whose weight and bias start at zero, so a fresh
MFA is the identity on x_main. Neither attention uses a softmax: the energies are divided
by their last dimension. Parameters: MFA(256,64,False) 63,264; MFA(512,256,True) 594,048;
MFA(1024,512,True) 2,367,744.
"""
import torch
import torch.nn as nn

from model.layers import convert_part, memory_format_of, rename_state_dict


class _OutputProjection(nn.Module):
    """1x1 conv (with bias) + zero-initialised BatchNorm."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        self.bn = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        return self.bn(self.conv(x))


class ChannelNonLocal(nn.Module):
    """Channel-to-channel attention from the side tensor onto the main tensor.

    query = 1x1(x_main) [B, low, Nh]; key = 1x1 stride s (x_side) [B, low, Nh];
    value = 1x1(x_side) [B, low, Nl]; y = (query keyᵀ / low) value -> [B, low, Hl, Wl];
    out = x_main + BN(1x1 stride s (y)). s = 2 when downsampling, else 1.

    A 1x1 conv of stride s reads only every s-th row and column, so y, and the value
    conv it comes from, are computed at those positions only (a quarter of the work for
    s = 2): every strided conv here is a stride-1 conv of the subsampled input.
    """

    def __init__(self, high_ch, low_ch, downsample):
        super().__init__()
        self.stride = 2 if downsample else 1
        self.low_ch = low_ch
        self.query = nn.Conv2d(high_ch, low_ch, 1)
        self.key = nn.Conv2d(low_ch, low_ch, 1)
        self.value = nn.Conv2d(low_ch, low_ch, 1)
        self.out_proj = _OutputProjection(low_ch, high_ch, 1)

    def forward(self, x_main, x_side):
        b = x_main.shape[0]
        if self.stride > 1:
            # one copy for both convs that read the subsampled map
            x_side = x_side[:, :, ::self.stride, ::self.stride].contiguous(memory_format=memory_format_of(x_side))
        value = self.value(x_side).flatten(2)
        query = self.query(x_main).flatten(2)
        key = self.key(x_side).flatten(2)
        energy = torch.matmul(query, key.transpose(1, 2))
        attention = energy / energy.shape[-1]
        if memory_format_of(x_main) == torch.channels_last:
            # (attention value) computed transposed comes out channels-last, as the
            # following conv wants it (the flattened maps above are free views then).
            y = torch.matmul(value.transpose(1, 2), attention.transpose(1, 2)).transpose(1, 2)
        else:
            y = torch.matmul(attention, value)
        y = y.view(b, self.low_ch, *x_side.shape[2:])
        return self.out_proj(y) + x_main


class PositionNonLocal(nn.Module):
    """Position-to-position attention with DEEN's reshape quirk (reduction 2), which the
    released model inherits and this block reproduces.

    Each (low/2)-channel 1x1-conv map is reinterpreted by a plain reshape as
    [B, low, N/2] ("low channels x half the positions"), not transposed properly:
    query [B, Nh/2, low], key [B, low, Nl/2], value [B, Nl/2, low];
    y = (query key / (Nl/2)) value -> [B, Nh/2, low] -> transposed -> read as
    [B, low/2, Hh, Wh]; out = x_main + BN(1x1(y)).
    """

    def __init__(self, high_ch, low_ch, reduction=2):
        super().__init__()
        inner = low_ch // reduction
        self.low_ch = low_ch
        self.inner = inner
        self.query = nn.Conv2d(high_ch, inner, 1)
        self.key = nn.Conv2d(low_ch, inner, 1)
        self.value = nn.Conv2d(low_ch, inner, 1)
        self.out_proj = _OutputProjection(inner, high_ch, 1)

    def forward(self, x_main, x_side):
        b = x_main.shape[0]
        value = self.value(x_side).reshape(b, self.low_ch, -1).transpose(1, 2)
        query = self.query(x_main).reshape(b, self.low_ch, -1).transpose(1, 2)
        key = self.key(x_side).reshape(b, self.low_ch, -1)
        energy = torch.matmul(query, key)
        y = torch.matmul(energy / energy.shape[-1], value)
        y = y.transpose(1, 2).reshape(b, self.inner, *x_main.shape[2:])
        return self.out_proj(y.contiguous(memory_format=memory_format_of(x_main))) + x_main


class MFA(nn.Module):
    def __init__(self, high_ch, low_ch, downsample):
        super().__init__()
        self.channel_nl = ChannelNonLocal(high_ch, low_ch, downsample)
        self.position_nl = PositionNonLocal(high_ch, low_ch)

    def forward(self, x_main, x_side):
        return self.position_nl(self.channel_nl(x_main, x_side), x_side)


def _convert_non_local(sd):
    rules = [("theta.", "query."), ("phi.", "key."), ("g.", "value."),
             ("W.0.", "out_proj.conv."), ("W.1.", "out_proj.bn.")]
    return rename_state_dict(sd, rules, "MFA")


def convert_released_state_dict(sd):
    """Released MFA_block keys (``{CNL,PNL}.{g,theta,phi,W.0,W.1}``) -> this module's keys.

    theta -> query (applied to x_main), phi -> key, g -> value, W.0/W.1 -> out_proj.conv/bn.
    """
    rename_state_dict(sd, [("CNL.", ""), ("PNL.", "")], "MFA")
    out = convert_part(sd, "CNL.", "channel_nl.", _convert_non_local)
    out.update(convert_part(sd, "PNL.", "position_nl.", _convert_non_local))
    return out
