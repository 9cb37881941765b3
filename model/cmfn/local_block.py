"""LocalBlock, the HiFuse "Local Feature Block" used in each MBUE branch (docs/cmfn.md).

x [B, C, H, W] -> x + permute_back(GELU(Linear(LayerNorm(permute(depthwise3x3(x)))))),
[B, C, H, W]. The depthwise 3x3 conv has a bias; the LayerNorm (eps 1e-6) and the C->C
linear layer act on the channels-last view. ConvNeXt-like but without the 4x expansion,
layer scale or drop path. Parameters at C=1024: 1,061,888.
"""
import torch.nn as nn
import torch.nn.functional as F

from model.layers import rename_state_dict


class LocalBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pointwise = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = F.gelu(self.pointwise(self.norm(y)))
        return x + y.permute(0, 3, 1, 2)


def convert_released_state_dict(sd):
    """Released Local_block keys (``dwconv``, ``norm``, ``pwconv``) -> this module's keys."""
    rules = [("dwconv.", "depthwise."), ("norm.", "norm."), ("pwconv.", "pointwise.")]
    return rename_state_dict(sd, rules, "LocalBlock")
