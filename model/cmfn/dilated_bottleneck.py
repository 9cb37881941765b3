"""The dilated bottleneck ``layer5`` of the released model (the paper figure labels it as
the third "HCE x1"; docs/cmfn.md).

x [B, in_ch, H, W] -> [B, in_ch, H, W]:
conv1x1 in_ch->mid_ch, BN, ReLU -> conv3x3 mid_ch->mid_ch (dilation d, padding d), BN, ReLU
-> conv1x1 mid_ch->in_ch, BN -> + x. Expansion 2 (in_ch = 2 * mid_ch, so no downsample is
needed) and **no final ReLU** (the released block is built with no_relu=True).
Parameters at (512, 256, 5): 854,016.
"""
import torch.nn as nn

from model.layers import ConvBN, rename_state_dict


class DilatedBottleneck(nn.Module):
    def __init__(self, in_ch=512, mid_ch=256, dilation=5):
        super().__init__()
        self.reduce = ConvBN(in_ch, mid_ch, 1, relu=True)
        self.dilated = ConvBN(mid_ch, mid_ch, 3, dilation=dilation, relu=True)
        self.expand = ConvBN(mid_ch, in_ch, 1)

    def forward(self, x):
        return self.expand(self.dilated(self.reduce(x))) + x


def convert_released_state_dict(sd):
    """Released ``layer5`` keys (an nn.Sequential holding one Bottleneck: ``0.conv1``,
    ``0.bn1``, ... ``0.bn3``; the leading ``0.`` may also be absent) -> this module's keys."""
    rules = []
    for lead in ("0.", ""):
        for i, name in ((1, "reduce"), (2, "dilated"), (3, "expand")):
            rules += [(f"{lead}conv{i}.", f"{name}.conv."), (f"{lead}bn{i}.", f"{name}.bn.")]
    return rename_state_dict(sd, rules, "DilatedBottleneck")
