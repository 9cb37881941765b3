"""Released TokenMatcher / CMAG checkpoints, read safely and mapped onto :class:`TokenMatcherEncoder`.

The released training scripts save ``{'state_dict': nn.DataParallel(model).state_dict(),
'epoch': int, 'best_mAP': numpy scalar}`` (``model_best.pth.tar``; ``best_mAP`` is a numpy
float64 after stage 1 and a float32 after stage 2). :func:`read_released_checkpoint` reads such
a file with ``torch.load(weights_only=True)``, allowing only the globals a pickled numpy float
scalar needs (:data:`NUMPY_SCALAR_GLOBALS`: numpy's scalar reconstructor under its numpy 1 and
numpy 2 module names, ``numpy.dtype`` and the float64 / float32 dtype classes); a file naming
any other Python global is refused with :class:`CheckpointError`, so nothing in the file can
run. A bare state dict is accepted as well.

Key layout, released (``module.`` stripped) -> this project (:func:`project_key`), for an
encoder of depth D:

==============================================  ==========================================
``cls_token``, ``pos_embed``                      the same
``visible_module.visible.<stem key>``             ``stems.visible.<stem key>``
``thermal_module.thermal.<stem key>``             ``stems.infrared.<stem key>``
``blocks.<i>.*`` (i < D-1)                        ``blocks.<i>.*``
``b1.0.*`` (the copy of the last block)           ``last_block.*``
``b1.1.*`` (the copy of the final LayerNorm)      ``last_norm.*``
``bottlenecks.<i>.*``                             ``token_bns.<i>.*``
``blocks.<D-1>.*``, ``norm.*``, ``bottleneck.*``  dropped: the released model never runs them
==============================================  ==========================================

In a stem key the two halves of an IBN, ``conv.<j>.IN`` / ``conv.<j>.BN``, become
``conv.<j>.inorm`` / ``conv.<j>.bnorm``. The TransReID-SSL pretraining file names its single
stem ``patch_embed`` with the same inner layout (:func:`stem_key`). K (class tokens), D and the
embedding width are read off the released tensors (:func:`released_geometry`). CMAG's released
checkpoints have exactly this layout: its training-time modules are not saved.
"""
import os
import re
import warnings
from collections import OrderedDict

import numpy as np
import torch

from engine.checkpoint import CheckpointError

DROPPED = "dropped"
STEM_PREFIXES = (("visible_module.visible.", "stems.visible."), ("thermal_module.thermal.", "stems.infrared."))
RENAMES = (("b1.0.", "last_block."), ("b1.1.", "last_norm."), ("bottlenecks.", "token_bns."))
_IBN_HALF = re.compile(r"^(conv\.\d+\.)(IN|BN)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)")
NUMPY_SCALAR_GLOBALS = (
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
)


def stem_key(key):
    """A key inside a released / pretrained stem as this project's :class:`ICSStem` names it."""
    return _IBN_HALF.sub(lambda m: m.group(1) + ("inorm." if m.group(2) == "IN" else "bnorm."), key)


def project_key(key, depth):
    """This project's key for released key `key` of a depth-`depth` encoder, :data:`DROPPED`
    for a tensor the released model never uses, or None for a key that is not in the layout."""
    if key in ("cls_token", "pos_embed"):
        return key
    for old, new in STEM_PREFIXES:
        if key.startswith(old):
            return new + stem_key(key[len(old):])
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    match = _BLOCK.match(key)
    if match:
        index = int(match.group(1))
        if index < depth - 1:
            return key
        return DROPPED if index == depth - 1 else None
    if key.startswith(("norm.", "bottleneck.")):
        return DROPPED
    return None


def strip_module_prefix(state):
    """`state` with a leading ``module.`` (nn.DataParallel / DDP) removed from every key."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def released_geometry(state):
    """``{"num_tokens", "depth", "embed_dim"}`` of a released state dict (``module.`` stripped)."""
    if "cls_token" not in state:
        raise CheckpointError("no cls_token: not a TokenMatcher / CMAG encoder state dict (keys: %s ...)"
                              % ", ".join(list(state)[:4]))
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, state) if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError("the encoder blocks are not numbered 0..D-1 (found %s)" % blocks)
    cls = state["cls_token"]
    return {"num_tokens": int(cls.shape[1]), "depth": len(blocks), "embed_dim": int(cls.shape[2])}


def convert_state_dict(state):
    """``(mapped, info)``: a released state dict (``module.`` optional) under this project's keys.

    ``info``: the geometry of :func:`released_geometry` and ``dropped`` (the released keys the
    model never runs). A key outside the layout raises :class:`CheckpointError` naming it.
    """
    state = strip_module_prefix(state)
    geometry = released_geometry(state)
    mapped, dropped, unmapped = OrderedDict(), [], []
    for key, value in state.items():
        new = project_key(key, geometry["depth"])
        if new is None:
            unmapped.append(key)
        elif new == DROPPED:
            dropped.append(key)
        else:
            mapped[new] = value
    if unmapped:
        raise CheckpointError("%d keys are not part of a TokenMatcher / CMAG encoder: %s%s"
                              % (len(unmapped), ", ".join(unmapped[:6]), " ..." if len(unmapped) > 6 else ""))
    return mapped, dict(geometry, dropped=dropped)


def _numpy_scalar_globals():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    # A file pickled under numpy 1 names the reconstructor numpy.core.multiarray.scalar.
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]


def _global_name(entry):
    return entry[1] if isinstance(entry, tuple) else "%s.%s" % (entry.__module__, entry.__qualname__)


def _unsafe_globals(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be scanned; the load error is reported instead
        return None


def load_allowlisted(path, extra_globals=(), what="checkpoint"):
    """``torch.load(path, weights_only=True)`` allowing the globals of :data:`NUMPY_SCALAR_GLOBALS`
    and `extra_globals` (objects or ``(object, "module.name")`` pairs), nothing else."""
    if not os.path.isfile(path):
        raise CheckpointError("%s not found: %s" % (what, path))
    extra = list(extra_globals)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals() + extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt pickles
        allowed = set(NUMPY_SCALAR_GLOBALS) | {_global_name(g) for g in extra}
        refused = [g for g in (_unsafe_globals(path) or []) if g not in allowed]
        if refused:
            raise CheckpointError(
                "%s stores Python objects other than tensors and numpy float scalars (%s); refusing to "
                "unpickle them, since that could run code from the file. Re-save its state dict with "
                "tensors and plain values only." % (path, ", ".join(refused))) from None
        detail = _UNPICKLER_ERROR.search(str(exc))
        raise CheckpointError("cannot read %s %s with weights_only=True: %s" % (
            what, path, detail.group(1) + " (refused: only tensors, plain values and numpy float scalars "
            "are read from this file)" if detail else exc)) from None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def read_released_checkpoint(path):
    """``{"state_dict", "epoch", "best_mAP"}`` of a released ``model_best.pth.tar`` (or a bare
    state dict): the state dict with ``module.`` stripped, epoch and best_mAP as Python numbers
    (None when the file has none)."""
    obj = load_allowlisted(path, what="released checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, epoch, best = obj["state_dict"], obj.get("epoch"), obj.get("best_mAP")
    else:
        state, epoch, best = obj, None, None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError("%s holds no encoder state dict: expected a dict of tensors or a dict with a "
                              "'state_dict' entry, found %s" % (path, found))
    return {"state_dict": strip_module_prefix(state), "epoch": _plain(epoch), "best_mAP": _plain(best)}


def load_released_encoder(model, path):
    """Fill `model` (a :class:`TokenMatcherEncoder`) from the released checkpoint `path`, strictly.

    Returns ``info`` (geometry, ``dropped`` keys, ``epoch``, ``best_mAP``); a file that does not
    fit the model's size (K, depth, width) raises :class:`CheckpointError` saying what differs.
    """
    released = read_released_checkpoint(path)
    mapped, info = convert_state_dict(released["state_dict"])
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    extra = [k for k in mapped if k not in own]
    wrong = ["%s %s vs %s" % (k, tuple(mapped[k].shape), tuple(own[k].shape))
             for k in own if k in mapped and mapped[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = ["%d keys %s: %s%s" % (len(keys), label, ", ".join(keys[:4]), " ..." if len(keys) > 4 else "")
                 for label, keys in (("missing from the file", missing), ("without a place in the model", extra),
                                     ("of another shape", wrong)) if keys]
        raise CheckpointError("%s (K=%d, depth %d, width %d) does not fit this encoder: %s"
                              % (path, info["num_tokens"], info["depth"], info["embed_dim"], "; ".join(parts)))
    model.load_state_dict(mapped)
    info.update(epoch=released["epoch"], best_mAP=released["best_mAP"])
    return info
