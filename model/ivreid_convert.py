"""Saved models of the IV-REID reference code, read safely and mapped onto :class:`model.ivreid.IVReID`.

The reference saves ``torch.save(model)``: the whole pickled model, naming its own classes
(``model.baseline.Baseline``, ``model.resnet.ResNet``, ``model.resnet.Bottleneck``) next to
torch.nn modules. :func:`load_reference_state_dict` reads such a file, in the zip format or
the legacy (torch < 1.6) one, without the reference code and without running anything from
the file: the three classes become empty ``nn.Module`` stand-ins (unpickling only restores
an object's ``__dict__``: its submodules, parameters and buffers), torch's own tensor and
storage rebuilders, torch.nn layer classes, ``collections.OrderedDict`` and ``set`` are
allowed, and every other global is refused (:class:`RefusedGlobal`). A plain state dict file,
keys optionally prefixed ``module.``, is read the same way.

Key layout, reference -> this project (:func:`project_key`):

================================  ======================================
``base.<torchvision ResNet key>``  ``backbone.<the same key>``
``bottleneck.*``                  ``head.bnneck.*``
``share_classifier.*``            ``head.classifier.*``
``ide_net.rgb_{bn,fc1,fc2}.*``    ``aux_visible.{bn,fc1,fc2}.*``
``ide_net.ir_{bn,fc1,fc2}.*``     ``aux_infrared.{bn,fc1,fc2}.*``
================================  ======================================

The saved models hold no auxiliary heads (the reference keeps them in a separate module it
never saves); :func:`convert_reference_state` initialises them afresh. For a backbone
without conv biases (``MODEL.IVREID.CONV_BIAS False``) each conv bias b is folded into the
BatchNorm that follows the conv, ``running_mean <- running_mean - b``: in eval mode
BN(conv(x) + b) is then computed exactly, and train-mode outputs never depended on b (the
batch mean removes it).
"""
import os
import pickle
import re
import sys
import types
import warnings
from collections import OrderedDict

import torch
from torch import nn

from engine.checkpoint import CheckpointError
from model.ivreid import AUX_HEADS, IVReID


class ReferenceModule(nn.Module):
    """Stand-in for a class of the reference code: unpickling fills its ``__dict__``, nothing runs."""


class Baseline(ReferenceModule):
    pass


class ResNet(ReferenceModule):
    pass


class Bottleneck(ReferenceModule):
    pass


STAND_INS = {
    ("model.baseline", "Baseline"): Baseline,
    ("model.resnet", "ResNet"): ResNet,
    ("model.resnet", "Bottleneck"): Bottleneck,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}


class RefusedGlobal(CheckpointError, pickle.UnpicklingError):
    """The file names a Python object that a saved IV-REID model never needs."""


def _allowed_torch_global(module, name):
    """A torch global fit for untrusted files, or None.

    Allowed: what torch's own ``weights_only`` unpickler accepts from torch (tensor and
    storage rebuilders, dtypes, sizes, Parameter) and the layer classes of torch.nn.modules
    (Conv2d, BatchNorm2d, Sequential, ...), which unpickling only allocates and fills. Other
    torch functions and classes (``torch.load``, ``torch.hub.load``, ...) could run code and
    are refused like any other global.
    """
    if module != "torch" and not module.startswith("torch."):
        return None
    vetted = torch._weights_only_unpickler._get_allowed_globals().get("%s.%s" % (module, name))
    if vetted is not None:
        return vetted
    # Only modules torch has already imported: looking a name up must not import anything.
    found = getattr(sys.modules.get(module), name, None) if module.startswith("torch.nn.modules.") else None
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found
    return None


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = STAND_INS.get((module, name)) or _allowed_torch_global(module, name)
        if allowed is None:
            raise RefusedGlobal(
                "refusing to unpickle the global %s.%s: a saved IV-REID model needs only its own classes "
                "(model.baseline.Baseline, model.resnet.ResNet, model.resnet.Bottleneck), torch tensors and "
                "torch.nn modules, OrderedDict and set. The file may run code when unpickled without this "
                "restriction; do not load it with weights_only=False." % (module, name)
            )
        return allowed


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load's pickle_module: it needs the Unpickler class and load().
restricted_pickle = types.ModuleType("ivreid_restricted_pickle", "pickle restricted to saved IV-REID models")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def load_reference_state_dict(path):
    """The state dict in `path`: a pickled reference model or a plain state dict, ``module.`` stripped."""
    if not os.path.isfile(path):
        raise CheckpointError("reference checkpoint not found: %s" % path)
    try:
        with warnings.catch_warnings():
            # Legacy files embed each class's source; the stand-ins' sources differ by design.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except RefusedGlobal as exc:
        raise RefusedGlobal("%s: %s" % (path, exc)) from None
    except Exception as exc:  # torch and pickle raise many types for corrupt or foreign files
        raise CheckpointError("cannot read %s as a saved IV-REID model: %s" % (path, exc)) from None
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state = obj
    else:
        raise CheckpointError("%s holds neither a pickled model nor a state dict (found %s)"
                              % (path, type(obj).__name__))
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


RENAMES = (
    ("base.", "backbone."),
    ("bottleneck.", "head.bnneck."),
    ("share_classifier.", "head.classifier."),
    ("ide_net.rgb_bn.", "aux_visible.bn."),
    ("ide_net.rgb_fc1.", "aux_visible.fc1."),
    ("ide_net.rgb_fc2.", "aux_visible.fc2."),
    ("ide_net.ir_bn.", "aux_infrared.bn."),
    ("ide_net.ir_fc1.", "aux_infrared.fc1."),
    ("ide_net.ir_fc2.", "aux_infrared.fc2."),
)
# A backbone conv bias: stem/block convs ``...convK.bias`` (followed by ``...bnK``) and shortcut
# convs ``...downsample.0.bias`` (followed by ``...downsample.1``).
CONV_BIAS = re.compile(r"^(base\.(?:.*\.)?)(?:conv(\d)|(downsample\.)0)\.bias$")


def project_key(reference_key):
    """This project's key for a reference key, or None when it has no place here."""
    for old, new in RENAMES:
        if reference_key.startswith(old):
            return new + reference_key[len(old):]
    return None


def following_bn(conv_bias_key):
    """The reference BatchNorm prefix after the conv of a conv-bias key, or None if not one."""
    match = CONV_BIAS.match(conv_bias_key)
    if match is None:
        return None
    prefix, k, downsample = match.groups()
    return prefix + ("downsample.1." if downsample else "bn%s." % k)


def map_reference_state_dict(state, conv_bias=True):
    """``(mapped, folded)``: `state` under this project's keys; without `conv_bias` the conv
    biases are folded into the following BN running means (``folded`` of them)."""
    unmapped = [k for k in state if project_key(k) is None]
    if unmapped:
        raise CheckpointError("%d keys are not part of a saved IV-REID model: %s%s"
                              % (len(unmapped), ", ".join(unmapped[:6]), " ..." if len(unmapped) > 6 else ""))
    mapped, folded = OrderedDict(), 0
    for key, value in state.items():
        if not conv_bias and following_bn(key) is not None:
            folded += 1
            continue
        mapped[project_key(key)] = value
    if not conv_bias:
        for key in state:
            bn = following_bn(key)
            if bn is None:
                continue
            if bn + "running_mean" not in state:
                raise CheckpointError("conv bias %s has no BatchNorm %srunning_mean to fold into" % (key, bn))
            mapped[project_key(bn + "running_mean")] = state[bn + "running_mean"] - state[key]
    return mapped, folded


def reference_num_classes(state):
    """Identities of the shared classifier of a reference state dict."""
    if "share_classifier.weight" not in state:
        raise CheckpointError("no share_classifier.weight: not a saved IV-REID model (keys: %s ...)"
                              % ", ".join(list(state)[:4]))
    return int(state["share_classifier.weight"].shape[0])


def convert_reference_state(state, cfg):
    """``(model_state, info)``: the state dict of ``IVReID.from_config(cfg, C)`` filled from `state`.

    The auxiliary heads the reference state lacks keep a fresh initialisation, drawn from
    ``cfg.SEED`` (without touching the global RNG), so the result loads strictly into the model
    of `cfg` and can be trained further. ``cfg.MODEL.PRETRAINED`` should be off: every backbone
    tensor comes from `state`. ``info``: ``num_classes``, ``mapped`` (tensors taken from
    `state`), ``initialised`` (keys of fresh tensors), ``folded_conv_biases``.
    """
    num_classes = reference_num_classes(state)
    mapped, folded = map_reference_state_dict(state, cfg.MODEL.IVREID.CONV_BIAS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED)
        model = IVReID.from_config(cfg, num_classes)
    try:
        result = model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError("the saved model does not fit the IV-REID model of this config: %s" % exc) from None
    missing = [k for k in result.missing_keys if not k.startswith(AUX_HEADS)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            "the saved model does not fit the IV-REID model of this config (MODEL.BACKBONE %s, "
            "MODEL.IVREID.CONV_BIAS %s): %d keys missing (%s), %d without a place (%s)"
            % (cfg.MODEL.BACKBONE, cfg.MODEL.IVREID.CONV_BIAS, len(missing), ", ".join(missing[:4]),
               len(result.unexpected_keys), ", ".join(result.unexpected_keys[:4]))
        )
    model_state = model.state_dict()
    info = {
        "num_classes": num_classes,
        "mapped": len(mapped),
        "initialised": [k for k in model_state if k not in mapped],
        "folded_conv_biases": folded,
    }
    return model_state, info
