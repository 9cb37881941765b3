"""Local Refinement Unit: a per-channel affine map and a 1x1 projection, each with BN and PReLU.

``LocalRefinementUnit(in_dim, out_dim)``: [B, in_dim, h, w] -> [B, out_dim, h, w], the spatial
size unchanged::

    x -> depthwise 1x1 conv (groups = in_dim, with bias: one scale and shift per channel)
      -> BatchNorm2d(in_dim) -> PReLU (one slope shared by all channels)
      -> pointwise 1x1 conv (in_dim -> out_dim, with bias)
      -> BatchNorm2d(out_dim) -> PReLU (one shared slope)

FusionReID puts one on the ResNet map (2048 -> 768 channels, 16 x 8 at 256x128) and one on the
ViT patch tokens read as a map (768 -> 768, 21 x 10). The convolutions keep PyTorch's default
initialisation (kaiming-uniform), the BNs weight 1 / bias 0 and the PReLUs their 0.25 slope, as
the released model starts them. Both conv biases feed a training-mode BatchNorm directly, which
removes any per-channel shift: their loss gradient is exactly zero, only weight decay moves them.
"""
from torch import nn


class LocalRefinementUnit(nn.Module):
    def __init__(self, in_dim, out_dim=768):
        super().__init__()
        self.depthwise = nn.Conv2d(in_dim, in_dim, kernel_size=1, groups=in_dim, bias=True)
        self.bn1 = nn.BatchNorm2d(in_dim)
        self.act1 = nn.PReLU()
        self.pointwise = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.act2 = nn.PReLU()

    def forward(self, x):
        x = self.act1(self.bn1(self.depthwise(x)))
        return self.act2(self.bn2(self.pointwise(x)))
