"""IRMLP, the inverted-residual MLP closing CSC-CMA's final fusion (docs/cmfn.md).

x [B, in_ch, H, W] -> [B, out_ch, H, W]:
y = BN(GELU(conv3x3(x)) + x); y = GELU(conv1x1 in->4in (y)); out = BN(conv1x1 4in->out (y)).
No biases, no final activation.

The released 3x3 conv is a **dense** in->in conv (its helper drops the group argument;
5.3M parameters at in=768). ``depthwise=True`` makes it the depthwise conv it was meant to
be. Parameters at (768, 256): 8,456,192 dense; 3,154,688 depthwise.
"""
import torch.nn as nn
import torch.nn.functional as F

from model.layers import ConvBN, ConversionError, rename_state_dict


class IRMLP(nn.Module):
    def __init__(self, in_ch, out_ch, depthwise=False):
        super().__init__()
        self.spatial = nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch if depthwise else 1,
                                 bias=False)
        self.residual_bn = nn.BatchNorm2d(in_ch)
        self.expand = nn.Conv2d(in_ch, 4 * in_ch, 1, bias=False)
        self.project = ConvBN(4 * in_ch, out_ch, 1)

    def forward(self, x):
        y = self.residual_bn(F.gelu(self.spatial(x)) + x)
        return self.project(F.gelu(self.expand(y)))


def convert_released_state_dict(sd, depthwise=False):
    """Released IRMLP keys (``conv1.conv``, ``bn1``, ``conv2.conv``, ``conv3.{conv,bn}``) ->
    this module's keys. The released 3x3 weights are dense, so they cannot initialise the
    depthwise variant (``depthwise=True`` raises)."""
    if depthwise and "conv1.conv.weight" in sd:
        raise ConversionError("IRMLP", "conv1.conv.weight",
                              f"is a dense 3x3 conv {tuple(sd['conv1.conv.weight'].shape)}; "
                              "it cannot be loaded into the depthwise variant")
    rules = [("conv1.conv.", "spatial."), ("bn1.", "residual_bn."), ("conv2.conv.", "expand."),
             ("conv3.conv.", "project.conv."), ("conv3.bn.", "project.bn.")]
    return rename_state_dict(sd, rules, "IRMLP")
