"""ImageNet weights for the ResNet backbone: finding the file and reading it.

The released model starts every ResNet from torchvision's ImageNet weights, the original
ResNet-50 file ``resnet50-19c8e357.pth``. Nothing is ever downloaded: the file comes from
``cfg.MODEL.PRETRAIN_PATH`` or, when that is empty, from the torch hub cache
(``torch.hub.get_dir()/checkpoints``) under one of torchvision's published names. Without
either, :class:`PretrainedWeightsError` says where to get the file and where to put it.

The file is a plain torchvision ``state_dict`` (``conv1.*``, ``bn1.*``, ``layer1..4.*``,
``fc.*``); it is read with ``weights_only=True``. Mapping its keys onto the two stems and the
shared stages is the backbone's job (:meth:`model.backbones.resnet.DualStemResNet.load_imagenet`).
"""
import os

import torch
from utils.errors import UserError

# torchvision's file names per architecture, most preferred first: the released code used the
# original ("old") ResNet-50 weights, so those win when several are cached.
HUB_FILES = {
    "resnet50": ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet18": ("resnet18-5c106cde.pth", "resnet18-f37072fd.pth"),
}
DOWNLOAD_ROOT = "https://download.pytorch.org/models/"


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights were asked for but no usable file is available."""


def hub_checkpoint_dir():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_imagenet_weights(arch, path=""):
    """The weight file to use: `path` if given (must exist), else the first cached hub file."""
    if arch not in HUB_FILES:
        raise PretrainedWeightsError(
            "no ImageNet weights known for backbone %r (known: %s)" % (arch, ", ".join(sorted(HUB_FILES)))
        )
    if path:
        if not os.path.isfile(path):
            raise PretrainedWeightsError(
                "MODEL.PRETRAIN_PATH points to %s, which does not exist; expected torchvision's %s "
                "ImageNet state dict (e.g. %s)" % (path, arch, HUB_FILES[arch][0])
            )
        return path
    folder = hub_checkpoint_dir()
    for name in HUB_FILES[arch]:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    url = DOWNLOAD_ROOT + HUB_FILES[arch][0]
    raise PretrainedWeightsError(
        "ImageNet weights for %s not found: none of %s is in %s and MODEL.PRETRAIN_PATH is empty. "
        "This project never downloads. Fetch %s yourself and either put it in %s or pass "
        "MODEL.PRETRAIN_PATH /path/to/%s; or train from scratch with MODEL.PRETRAINED False."
        % (arch, ", ".join(HUB_FILES[arch]), folder, url, folder, HUB_FILES[arch][0])
    )


def read_imagenet_weights(path):
    """The state dict stored in `path` (a bare state dict or one under a 'state_dict' key)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise PretrainedWeightsError("cannot read ImageNet weights %s: %s" % (path, exc)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedWeightsError(
            "%s is not a torchvision ResNet state dict (expected a dict of tensors with keys "
            "conv1.weight, bn1.*, layer1.* ...)" % path
        )
    return state
