"""Single-stream ResNet: one stem and one body shared by every image, whatever its modality.

torchvision's ``resnet50`` / ``resnet18`` definitions (the 3x3 conv of a bottleneck carries
the stride; a 1x1 conv + BN shortcut wherever the shape changes) with three options:

* ``last_stride``: stride of the first block of ``layer4`` (1 keeps layer3's resolution; no
  dilation);
* ``conv_bias``: every convolution carries a bias (53 convs in ResNet-50, 20 in ResNet-18),
  initialised as ``nn.Conv2d`` does, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Each conv feeds a
  BatchNorm, so in train mode the batch mean removes the bias exactly (it changes no output
  and gets no gradient); in eval mode it acts through the BN running mean, which has absorbed
  it, so a bias-free network with ``running_mean - bias`` computes the same function;
* ``stem_relu``: a ReLU between the stem BN and the max-pool. Without it the stem is
  conv1 -> bn1 -> maxpool: negative values reach ``layer1``, and ``bn1.bias`` (a per-channel
  constant that passes the max-pool unchanged) only shifts what the next BatchNorms remove
  in train mode.

Parameter and buffer names are torchvision's (``conv1``, ``bn1``, ``layer1..4``; no ``fc``),
so a torchvision ImageNet state dict loads key for key (:meth:`SingleStreamResNet.load_imagenet`).

Feature maps for an input [N, 3, H, W], ResNet-50 (ResNet-18 widths in brackets), last stride 1:

=========  ===========================
stem       [N, 64 (64), H/4, W/4]
layer1     [N, 256 (64), H/4, W/4]
layer2     [N, 512 (128), H/8, W/8]
layer3     [N, 1024 (256), H/16, W/16]
layer4     [N, 2048 (512), H/16, W/16]  (H/32, W/32 with last stride 2)
=========  ===========================

``out_channels`` is the layer4 width.
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones.resnet import ARCHS, _preview, _set_first_stride
from model.pretrained import copy_by_key
from utils.compat import torchvision  # noqa: F401  (makes torchvision.models importable)
from utils.errors import ConfigError
import torchvision.models

logger = logging.getLogger("cmfn")


def add_conv_biases(module):
    """Give every bias-free ``nn.Conv2d`` inside `module` a bias with nn.Conv2d's default init.

    Returns the number of convs changed.
    """
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.bias is None:
            bound = 1.0 / math.sqrt(conv.weight[0].numel())
            bias = torch.empty(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
            conv.bias = nn.Parameter(bias.uniform_(-bound, bound))
            count += 1
    return count


class SingleStreamResNet(nn.Module):
    """conv1 -> bn1 -> [ReLU] -> maxpool -> layer1..layer4: [N, 3, H, W] -> [N, out_channels, h, w]."""

    def __init__(self, arch="resnet50", last_stride=1, conv_bias=True, stem_relu=False):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError("MODEL.BACKBONE must be one of %s, got %r" % (", ".join(ARCHS), arch))
        if last_stride not in (1, 2):
            raise ConfigError("MODEL.LAST_STRIDE must be 1 or 2, got %r" % (last_stride,))
        net = getattr(torchvision.models, arch)(weights=None)
        _set_first_stride(net.layer4, last_stride)
        self.arch = arch
        self.stem_relu = bool(stem_relu)
        self.out_channels = net.fc.in_features
        self.conv1, self.bn1, self.maxpool = net.conv1, net.bn1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if conv_bias:
            add_conv_biases(self)

    def stem(self, x):
        """[N, 3, H, W] -> [N, 64, H/4, W/4]."""
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = F.relu(x, inplace=True)
        return self.maxpool(x)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def load_imagenet(self, state, source="<state dict>"):
        """Copy a torchvision ImageNet state dict into this network, key for key.

        ``fc.*`` has no place here; conv biases (absent from torchvision's files) keep their
        init. Returns ``{"loaded": [...], "missing": [...], "unused": [...]}`` (keys of this
        module / of the file; conv biases and BN batch counters are not counted as missing)
        and logs the counts; a shape mismatch raises :class:`model.pretrained.PretrainedWeightsError`.
        """
        loaded, missing, unused = copy_by_key(self, state.items(), source, "%s backbone" % self.arch)
        conv_biases = {name + ".bias" for name, m in self.named_modules()
                       if isinstance(m, nn.Conv2d) and m.bias is not None}
        missing = sorted(set(missing) - conv_biases)
        logger.info(
            "ImageNet weights %s: loaded %d tensors into the single-stream %s (%d conv biases keep their init), "
            "%d missing%s, %d unexpected (in the file, unused)%s",
            source, len(loaded), self.arch, len(conv_biases - set(loaded)), len(missing), _preview(missing),
            len(unused), _preview(unused),
        )
        return {"loaded": loaded, "missing": missing, "unused": unused}
