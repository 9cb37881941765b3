"""The TransReID-style ResNet of FusionReID's CNN branch.

torchvision's ResNet definitions (the 3x3 conv of a bottleneck carries the stride; a 1x1 conv +
BN shortcut on the first block of every stage) with the stem the TransReID family uses:

    conv1 7x7/2 pad 3 (no bias) -> bn1 -> (no ReLU) -> MaxPool2d(kernel 2, stride 2, pad 0)
    -> layer1 .. layer4, layer4 with first stride ``last_stride`` (1 as released; no dilation)

Without the stem ReLU, negative values reach ``layer1``. ``standard_stem=True`` puts back the
usual ReLU and 3x3/2 (pad 1) max-pool (same map sizes for even inputs). There is no avgpool
and no fc: the output is the layer4 map. For an input [B, 3, H, W] (ResNet-50; ResNet-18
widths in brackets), last stride 1:

=========  ===========================
stem       [B, 64 (64), H/4, W/4]
layer1     [B, 256 (64), H/4, W/4]
layer2     [B, 512 (128), H/8, W/8]
layer3     [B, 1024 (256), H/16, W/16]
layer4     [B, 2048 (512), H/16, W/16]
=========  ===========================

Without ImageNet weights every conv has PyTorch's default init (kaiming-uniform, a = sqrt(5))
and every BN weight 1 / bias 0, as released (torchvision's own kaiming-normal init is undone).

API:
    TransReIDResNet(arch="resnet50", last_stride=1, standard_stem=False)
        forward(x [B,3,H,W]) -> [B, out_channels, H/16, W/16];  ``out_channels`` (2048 / 512)
    load_imagenet(resnet, weights, source=None) -> {"loaded", "missing", "unused"}
        ``weights``: a torchvision-layout state dict or a path to one
    build_transreid_resnet(arch, last_stride, standard_stem, pretrained, pretrain_path, download)
        the network, with ImageNet weights from ``pretrain_path`` or the torch hub cache when
        ``pretrained`` (downloaded there only when ``download``)
    released_key(name) -> own key;  convert_released(state, prefix="resnet.base.") -> (mapped, dropped)
        the released FusionReID state dict's CNN-branch entries under this module's names
        (torchvision names on both sides; nothing is dropped)

Parameter and buffer names are torchvision's minus ``fc``.
"""
import logging
import os

from torch import nn

from model.backbones.resnet import _preview, _set_first_stride
from model.pretrained import PretrainedWeightsError, copy_by_key, find_imagenet_weights, read_imagenet_weights
from utils.compat import torchvision  # noqa: F401  (makes torchvision.models importable)
from utils.errors import ConfigError
import torchvision.models

logger = logging.getLogger("cmfn")

ARCHS = ("resnet50", "resnet101", "resnet152", "resnet18", "resnet34")
RELEASED_PREFIX = "resnet.base."


class TransReIDResNet(nn.Module):
    """conv1 -> bn1 -> maxpool 2x2 -> layer1..layer4: [B, 3, H, W] -> [B, out_channels, H/16, W/16]."""

    def __init__(self, arch="resnet50", last_stride=1, standard_stem=False):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError("the FusionReID CNN branch must be one of %s, got %r" % (", ".join(ARCHS), arch))
        if last_stride not in (1, 2):
            raise ConfigError("the last stride of the FusionReID ResNet must be 1 or 2, got %r" % (last_stride,))
        net = getattr(torchvision.models, arch)(weights=None)
        _set_first_stride(net.layer4, last_stride)
        self.arch = arch
        self.out_channels = net.fc.in_features
        self.conv1, self.bn1 = net.conv1, net.bn1
        self.relu = nn.ReLU() if standard_stem else nn.Identity()
        if standard_stem:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_imagenet(resnet, weights, source=None):
    """Copy a torchvision-layout ImageNet state dict into `resnet`, key for key.

    `weights` is the state dict or a path to it (read with ``weights_only=True``; a dict under
    ``state_dict`` is unwrapped). Keys containing ``fc`` are skipped and a leading ``base.`` is
    stripped, as the released loader does. Returns ``{"loaded", "missing", "unused"}`` (keys of
    the network not filled / keys of the file without a place; BN batch counters, absent from
    files saved before torch 0.4.1, are not counted as missing) and logs the counts. A shape
    mismatch, or a file of which nothing fits, raises :class:`PretrainedWeightsError`.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = source or str(weights)
        weights = read_imagenet_weights(weights)
    source = source or "<state dict>"
    # the released loader skips the classifier and strips a leading "base."
    items = [(key[len("base."):] if key.startswith("base.") else key, value)
             for key, value in weights.items() if "fc" not in key]
    loaded, missing, unused = copy_by_key(resnet, items, source, "TransReID %s branch" % resnet.arch)
    if not loaded:
        raise PretrainedWeightsError(
            "ImageNet weights %s: no entry fits the %s branch (expected torchvision keys conv1.weight, "
            "bn1.*, layer1.* ...; found %s)" % (source, resnet.arch, ", ".join(sorted(weights)[:6]) or "no keys")
        )
    logger.info(
        "ImageNet weights %s: loaded %d tensors into the TransReID %s, %d missing%s, %d unexpected (unused)%s",
        source, len(loaded), resnet.arch, len(missing), _preview(missing), len(unused), _preview(unused),
    )
    return {"loaded": loaded, "missing": missing, "unused": unused}


def build_transreid_resnet(arch="resnet50", last_stride=1, standard_stem=False, pretrained=False,
                           pretrain_path="", download=True):
    """A :class:`TransReIDResNet`; with `pretrained`, ImageNet weights from `pretrain_path` or
    the torch hub cache (downloaded into it only when `download`)."""
    resnet = TransReIDResNet(arch, last_stride, standard_stem)
    if pretrained:
        path = find_imagenet_weights(arch, pretrain_path, download=download)
        load_imagenet(resnet, path)
    return resnet


def released_key(name):
    """This module's key for a released key relative to ``resnet.base.`` (the same name)."""
    return name


def convert_released(state, prefix=RELEASED_PREFIX):
    """The entries of a released state dict under `prefix`, renamed to this module's keys.

    Returns ``(mapped, dropped)``: ``{own key: tensor}`` and the released keys left out (none
    for this branch). Entries outside `prefix` are ignored.
    """
    mapped = {released_key(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
    return mapped, []
