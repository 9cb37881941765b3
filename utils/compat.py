"""Import torchvision on any torch build.

The PyPI torchvision wheel ships a C extension compiled against CUDA torch. On a CPU-only
torch that extension cannot load, and ``import torchvision`` then dies while registering
fake kernels for ``torchvision::nms`` / ``torchvision::qnms`` because their op schemas were
never defined. Defining the two schemas first lets the pure-Python parts (models,
transforms) import; ``nms`` and ``torchvision.io`` stay unavailable there (we decode with
PIL). On a proper install the extension defines the ops itself and this is a no-op.

timm imports torchvision at import time, so it comes through here too. Every module of this
project imports both through here::

    from utils.compat import torchvision, timm
"""
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fragment = None


def _has_op(name):
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::" + name, "")
        return True
    except RuntimeError:
        return False


def _ensure_schemas():
    global _fragment
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _fragment.define(_SCHEMAS[name])


try:
    import torchvision  # noqa: E402
except RuntimeError as exc:
    if "torchvision::" not in str(exc):
        raise
    import sys

    # Drop the half-initialised package so the second import starts from scratch.
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    _ensure_schemas()
    import torchvision  # noqa: E402,F811

import timm  # noqa: E402  (after torchvision, which it imports)

__all__ = ["torchvision", "timm"]
