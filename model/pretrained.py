"""ImageNet weights for the ResNet backbone: finding, downloading and reading the file.

The released model starts every ResNet from torchvision's ImageNet weights, the original
ResNet-50 file ``resnet50-19c8e357.pth``. :func:`find_imagenet_weights` takes the file from
``cfg.MODEL.PRETRAIN_PATH`` or, when that is empty, from the torch hub cache
(``torch.hub.get_dir()/checkpoints``) under one of torchvision's published names. When neither
has it and downloading is allowed (``cfg.MODEL.DOWNLOAD``, default True) the first name of
:data:`HUB_FILES` is downloaded from ``https://download.pytorch.org/models/`` into the hub
cache, with a progress bar. torchvision's file names carry the first hex digits of the file's
SHA-256 after the last dash (``resnet50-19c8e357.pth``); the download is written to a
temporary file, that prefix is checked, and only then is it renamed into place, so a partial or
corrupt download never stays in the cache. With ``MODEL.DOWNLOAD False`` (offline machines) or
when the download fails, :class:`PretrainedWeightsError` says in one line what went wrong,
where to get the file and where to put it.

The download itself goes through the module-level :func:`fetch_url` (tests replace it).

The file is a plain torchvision ``state_dict`` (``conv1.*``, ``bn1.*``, ``layer1..4.*``,
``fc.*``); it is read with ``weights_only=True``. Mapping its keys onto the two stems and the
shared stages is the backbone's job (:meth:`model.backbones.resnet.DualStemResNet.load_imagenet`).
"""
import hashlib
import os
import re
import tempfile

import torch
from utils.errors import UserError

# torchvision's file names per architecture, most preferred first: the released code used the
# original ("old") ResNet-50 weights, so those win when several are cached, and the first name
# is the one downloaded.
HUB_FILES = {
    "resnet50": ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet18": ("resnet18-5c106cde.pth", "resnet18-f37072fd.pth"),
}
DOWNLOAD_ROOT = "https://download.pytorch.org/models/"
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,64})\.[^.]+$")


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights were asked for but no usable file is available."""


def hub_checkpoint_dir():
    """The torch hub checkpoint folder, ``torch.hub.get_dir()/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def hash_prefix(filename):
    """The SHA-256 prefix in a torchvision file name (``resnet50-19c8e357.pth`` -> ``19c8e357``),
    or None when the name carries none."""
    match = _HASH_PREFIX.search(os.path.basename(filename))
    return match.group(1) if match else None


def sha256_of(path):
    """The hex SHA-256 digest of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_url(url, dst, progress=True):
    """Fetch `url` into the file `dst` (a temporary name: the caller checks and renames it),
    with a progress bar on stderr when `progress`. Tests replace this function so that no test
    ever opens a connection; ``torch.hub.download_url_to_file`` is looked up at call time."""
    torch.hub.download_url_to_file(url, dst, progress=progress)


def download_imagenet_weights(arch, progress=True):
    """Download torchvision's `arch` weights (the first name of :data:`HUB_FILES`) into the hub
    cache and return the path. The file goes to a temporary name in the same folder, its
    SHA-256 is checked against the prefix in its name and only then is it renamed into place;
    on any failure the temporary file is removed and :class:`PretrainedWeightsError` names the
    URL, the destination and the cause."""
    name = HUB_FILES[arch][0]
    url = DOWNLOAD_ROOT + name
    folder = hub_checkpoint_dir()
    dst = os.path.join(folder, name)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".partial", dir=folder)
        os.close(fd)
        fetch_url(url, tmp, progress=progress)
        expected = hash_prefix(name)
        if expected:
            actual = sha256_of(tmp)
            if not actual.startswith(expected):
                raise ValueError("checksum mismatch: SHA-256 %s... does not start with %s"
                                 % (actual[:len(expected) + 4], expected))
        os.replace(tmp, dst)
        tmp = None
    except (OSError, RuntimeError, ValueError) as exc:  # no network, HTTP error, bad file, disk
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise PretrainedWeightsError(
            "downloading ImageNet weights for %s from %s to %s failed: %s. Fetch the file "
            "yourself and put it in %s or pass MODEL.PRETRAIN_PATH /path/to/%s; MODEL.DOWNLOAD "
            "False never downloads; MODEL.PRETRAINED False trains from scratch."
            % (arch, url, dst, cause, folder, name)
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return dst


def find_imagenet_weights(arch, path="", download=True):
    """The weight file to use for backbone `arch`: `path` if given (it must exist), else the
    first torchvision file of :data:`HUB_FILES` found in the hub cache, else (when `download`,
    the caller's ``cfg.MODEL.DOWNLOAD``) the first name downloaded into the hub cache. Without
    a file and with `download` False, :class:`PretrainedWeightsError` says where to put it."""
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
    if download:
        return download_imagenet_weights(arch)
    url = DOWNLOAD_ROOT + HUB_FILES[arch][0]
    raise PretrainedWeightsError(
        "ImageNet weights for %s not found: none of %s is in %s and MODEL.PRETRAIN_PATH is empty, "
        "and MODEL.DOWNLOAD is False (set MODEL.DOWNLOAD True to download it). Fetch %s yourself "
        "and either put it in %s or pass MODEL.PRETRAIN_PATH /path/to/%s; or train from scratch "
        "with MODEL.PRETRAINED False."
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


def copy_by_key(module, items, source, what):
    """Copy the (key, tensor) `items` of a weights file into the same-named entries of
    `module`'s state dict.

    Items whose key `module` lacks are returned as unused; a tensor whose shape differs from
    the module's raises :class:`PretrainedWeightsError` naming the file (`source`), the key and
    `what` the module is. The filled entries are loaded (strict=False). Returns
    (loaded keys, keys of `module` left unfilled, unused file keys), each sorted; BN batch
    counters, absent from files saved before torch 0.4.1, are not counted as unfilled.
    """
    own = module.state_dict()
    mapped, unused = {}, []
    for key, value in items:
        if key not in own:
            unused.append(key)
            continue
        if own[key].shape != value.shape:
            raise PretrainedWeightsError("ImageNet weights %s: %s has shape %s, the %s expects %s"
                                         % (source, key, tuple(value.shape), what, tuple(own[key].shape)))
        mapped[key] = value
    missing = sorted(k for k in set(own) - set(mapped) if not k.endswith("num_batches_tracked"))
    module.load_state_dict(mapped, strict=False)
    return sorted(mapped), missing, sorted(unused)
