"""HCE, the Hierarchical Context Extractor (DSNet "MFACB" / STDC style; docs/cmfn.md).

Two summed paths on x [B, in_ch, H, W] -> [B, out_ch, H, W]:

* chain: three conv3x3-BN-ReLU units with dilations d1, d2, d3 (padding = dilation, size
  kept), in_ch -> mid_ch -> mid_ch -> mid_ch; their three outputs are concatenated
  (3 * mid_ch channels) and fused by conv1x1-BN-ReLU to out_ch;
* shortcut: conv1x1-BN-ReLU in_ch -> out_ch.

There is no ReLU after the sum. CMFN uses dilations (2, 3, 5) everywhere (the paper
figure draws 1, 2, 3). Parameters: HCE(64,128,256) 485,120; HCE(256,256,64) 1,836,800;
HCE(256,256,256) 2,034,176.
"""
import torch
import torch.nn as nn

from model.layers import ConvBN, rename_state_dict


class HCE(nn.Module):
    def __init__(self, in_ch, mid_ch, out_ch, dilations=(2, 3, 5)):
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"HCE expects three dilations, got {dilations}")
        widths = [in_ch, mid_ch, mid_ch]
        self.units = nn.ModuleList(
            ConvBN(w, mid_ch, 3, dilation=d, relu=True) for w, d in zip(widths, dilations))
        self.fuse = ConvBN(3 * mid_ch, out_ch, 1, relu=True)
        self.shortcut = ConvBN(in_ch, out_ch, 1, relu=True)

    def forward(self, x):
        shortcut = self.shortcut(x)
        feats = []
        y = x
        for unit in self.units:
            y = unit(y)
            feats.append(y)
        return self.fuse(torch.cat(feats, dim=1)) + shortcut


def convert_released_state_dict(sd):
    """Released HCE keys (``conv_list.{i}.{conv,bn}``, ``process1.{0,1}`` = shortcut,
    ``process2.{0,1}`` = fuse) -> this module's keys."""
    rules = [(f"conv_list.{i}.", f"units.{i}.") for i in range(3)]
    rules += [("process1.0.", "shortcut.conv."), ("process1.1.", "shortcut.bn."),
              ("process2.0.", "fuse.conv."), ("process2.1.", "fuse.bn.")]
    return rename_state_dict(sd, rules, "HCE")
