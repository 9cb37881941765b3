"""Two modality stems and a shared ResNet body (the CMFN backbone; docs/cmfn.md).

Visible and infrared images each go through their own stem (7x7/2 conv, BN, ReLU, 3x3/2
max-pool; separate weights), then through ResNet stages ``layer1..layer4`` shared by both
modalities. The stages are torchvision's ``resnet50`` / ``resnet18`` definitions with the
first stride of ``layer4`` set to ``cfg.MODEL.LAST_STRIDE`` (1 as released; no dilation).

The released code builds three complete ResNet-50s and uses only the stems of two and the
stages of the third; the unused bodies are not instantiated here. Feature maps for an input
[N, 3, H, W] with ResNet-50 (ResNet-18 widths in brackets), last stride 1:

=========  ========================  =========================
stem       [N, 64 (64), H/4, W/4]
layer1     [N, 256 (64), H/4, W/4]
layer2     [N, 512 (128), H/8, W/8]
layer3     [N, 1024 (256), H/16, W/16]
layer4     [N, 2048 (512), H/16, W/16]
=========  ========================  =========================

``stage_channels`` holds these five widths; the CMFN derives all of its module widths from
them. ``num_stages=3`` leaves ``layer4`` out (the RegDB configuration never uses it).
"""
import logging

import torch
from torch import nn

from model.base import INFRARED, VISIBLE, modality_ids
from model.pretrained import find_imagenet_weights, read_imagenet_weights
from utils.compat import torchvision  # noqa: F401  (makes torchvision.models importable)
import torchvision.models

logger = logging.getLogger("cmfn")

ARCHS = ("resnet50", "resnet18")
MODALITIES = ("visible", "infrared")


class ModalityStem(nn.Module):
    """conv 7x7 stride 2 (no bias) -> BN -> ReLU -> max-pool 3x3 stride 2: [N,3,H,W] -> [N,w,H/4,W/4]."""

    def __init__(self, width=64):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # torchvision's ResNet initialisation, so a stem from scratch matches the stages.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.maxpool(self.relu(self.bn(self.conv(x))))


def _set_first_stride(stage, stride):
    """Give the first block of `stage` the spatial stride `stride` (main conv and shortcut)."""
    for module in stage[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (stride, stride)


class DualStemResNet(nn.Module):
    """Visible stem, infrared stem, shared ResNet stages ``layer1..layer<num_stages>``."""

    def __init__(self, arch="resnet50", last_stride=1, num_stages=4):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError("MODEL.BACKBONE must be one of %s, got %r" % (", ".join(ARCHS), arch))
        if last_stride not in (1, 2):
            raise ValueError("MODEL.LAST_STRIDE must be 1 or 2, got %r" % (last_stride,))
        if num_stages not in (3, 4):
            raise ValueError("num_stages must be 3 or 4, got %r" % (num_stages,))
        net = getattr(torchvision.models, arch)(weights=None)
        _set_first_stride(net.layer4, last_stride)
        stem_width = net.conv1.out_channels
        expansion = type(net.layer1[0]).expansion
        self.arch = arch
        self.num_stages = num_stages
        self.stage_channels = (stem_width,) + tuple(stem_width * 2**i * expansion for i in range(4))
        self.visible_stem = ModalityStem(stem_width)
        self.infrared_stem = ModalityStem(stem_width)
        for i in range(1, num_stages + 1):
            setattr(self, "layer%d" % i, getattr(net, "layer%d" % i))

    def stem(self, x, modality):
        """One modality's stem: [N,3,H,W] -> [N,64,H/4,W/4]."""
        if modality == "visible":
            return self.visible_stem(x)
        if modality == "infrared":
            return self.infrared_stem(x)
        raise ValueError("modality must be one of %s, got %r" % (", ".join(MODALITIES), modality))

    def stem_rows(self, x, modality):
        """Each row of `x` [N,3,H,W] through the stem of its modality -> [N,64,H/4,W/4].

        `modality` is a per-row int64 tensor (0 visible, 1 infrared) or one name for all rows.
        In train mode each stem's BatchNorm sees only its own modality's rows.
        """
        if isinstance(modality, str):
            return self.stem(x, modality)
        modality = modality_ids(modality, x.shape[0], x.device)
        visible = modality == VISIBLE
        if bool(((modality != VISIBLE) & (modality != INFRARED)).any()):
            raise ValueError("modality entries must be 0 (visible) or 1 (infrared), got %s"
                             % sorted(set(modality.tolist())))
        n_vis = int(visible.sum())
        if n_vis == len(visible):
            return self.visible_stem(x)
        if n_vis == 0:
            return self.infrared_stem(x)
        if bool(visible[:n_vis].all()):
            # paired batches put the visible rows first: no reordering needed
            return torch.cat([self.visible_stem(x[:n_vis]), self.infrared_stem(x[n_vis:])], dim=0)
        order = torch.cat([visible.nonzero().flatten(), (~visible).nonzero().flatten()])
        out = torch.cat([self.visible_stem(x[order[:n_vis]]), self.infrared_stem(x[order[n_vis:]])], dim=0)
        return out[torch.argsort(order)]

    def stages(self):
        return [getattr(self, "layer%d" % i) for i in range(1, self.num_stages + 1)]

    def load_imagenet(self, state, source="<state dict>"):
        """Copy a torchvision ImageNet state dict into both stems and the shared stages.

        ``conv1``/``bn1`` go into both stems (as released, where each modality's ResNet loaded
        the same file); ``layerK`` into the stages present; ``fc`` and absent stages are unused.
        Returns ``{"loaded": [...], "missing": [...], "unused": [...]}`` (keys of this module /
        of the file) and logs the counts; shape mismatches raise.
        """
        own = self.state_dict()
        mapped, unused = {}, []
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in ("conv1", "bn1"):
                part = "conv" if head == "conv1" else "bn"
                targets = ["%s.%s.%s" % (stem, part, rest) for stem in ("visible_stem", "infrared_stem")]
            else:
                targets = [key]
            targets = [t for t in targets if t in own]
            if not targets:
                unused.append(key)
            for target in targets:
                if own[target].shape != value.shape:
                    raise ValueError(
                        "ImageNet weights %s: %s has shape %s, the %s backbone expects %s for %s"
                        % (source, key, tuple(value.shape), self.arch, tuple(own[target].shape), target)
                    )
                mapped[target] = value
        # Files saved before torch 0.4.1 (the old resnet50-19c8e357.pth) carry no BN batch
        # counters; those stay at 0 and are not worth a warning.
        missing = sorted(k for k in set(own) - set(mapped) if not k.endswith("num_batches_tracked"))
        self.load_state_dict(mapped, strict=False)
        logger.info(
            "ImageNet weights %s: loaded %d tensors into the %s backbone, %d missing%s, %d unexpected (in the file, unused)%s",
            source, len(mapped), self.arch, len(missing), _preview(missing), len(unused), _preview(unused),
        )
        return {"loaded": sorted(mapped), "missing": missing, "unused": sorted(unused)}


def _preview(keys, limit=6):
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    return " (%s%s)" % (shown, ", ..." if len(keys) > limit else "")


MBUE_POSITIONS = {"layer3": 4, "layer2": 3}


def num_stages_for(cfg):
    """ResNet stages a model of `cfg` runs: 4, or 3 when MBUE sits after layer2 (RegDB)."""
    position = cfg.MODEL.CMFN.MBUE_AFTER
    if position not in MBUE_POSITIONS:
        raise ValueError(
            "MODEL.CMFN.MBUE_AFTER must be one of %s, got %r" % (", ".join(MBUE_POSITIONS), position)
        )
    return MBUE_POSITIONS[position]


def build_backbone(cfg, num_stages=4):
    """The backbone of ``cfg.MODEL`` with ImageNet weights when ``cfg.MODEL.PRETRAINED``."""
    backbone = DualStemResNet(cfg.MODEL.BACKBONE, cfg.MODEL.LAST_STRIDE, num_stages)
    if cfg.MODEL.PRETRAINED:
        path = find_imagenet_weights(cfg.MODEL.BACKBONE, cfg.MODEL.PRETRAIN_PATH, download=cfg.MODEL.DOWNLOAD)
        backbone.load_imagenet(read_imagenet_weights(path), source=path)
    return backbone
