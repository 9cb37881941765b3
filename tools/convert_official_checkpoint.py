"""Convert a checkpoint of the released CMFN or IV-REID code into this project's checkpoint format.

    python tools/convert_official_checkpoint.py SRC DST --dataset sysu|regdb|llcm [--num-classes N]
    python tools/convert_official_checkpoint.py SRC DST --method ivreid --dataset sysu|regdb [--fold-conv-bias]
    python tools/convert_official_checkpoint.py SRC DST --method tokenmatcher|cmag --dataset sysu|regdb [KEY VALUE ...]
    python tools/convert_official_checkpoint.py SRC DST --method fusionreid --dataset market1501|dukemtmc|msmt17 [KEY VALUE ...]

SRC is what the released training scripts saved with ``torch.save``: a dict with the
state dict under ``net`` (plus values such as epoch, mAP, cmc), or a bare state dict; keys
may carry a ``module.`` prefix (DataParallel). Its key layout is the one listed in
tests/golden/released_state_dict_*.txt. The used tensors are mapped onto this project's
modules (:func:`model.cmfn.cmfn.convert_released_state_dict`); the tensors the released model
never uses are dropped and counted; a key that maps nowhere is an error. DST is written
with engine.checkpoint (config = configs/cmfn/<dataset>.yaml, PRETRAINED off) so that
``model.load_model(DST)`` rebuilds the model.

Loading is ``weights_only=True``. The released scripts also stored numpy values (cmc, mAP),
which need numpy's array/scalar reconstructors: those few globals (and nothing else) are
allowed. A file needing any other global is refused with an explanation; ``--unsafe-load``
then unpickles it with ``weights_only=False``, which can run arbitrary code from the file:
use it only for files you trust.

``--method ivreid``: SRC is a ``*_best.pth`` of the IV-REID code, i.e. ``torch.save(model)`` of
the whole model (zip or legacy format), or a plain state dict. It is read by a restricted
unpickler that stands in for the three IV-REID classes and refuses every global but torch's
tensor machinery, torch.nn modules, OrderedDict and set, so nothing in the file can run
(:mod:`model.ivreid_convert`). DST holds the IV-REID model of the ``ivreid`` preset of
--dataset (PRETRAINED off), for ``model.load_model(DST)``; the two auxiliary modality
classifiers, which the IV-REID code never saves, are freshly initialised from the config's
SEED so that DST loads strictly and can be trained further. ``--fold-conv-bias`` builds the model with
``MODEL.IVREID.CONV_BIAS False`` and folds each conv bias into the next BN's running mean
(the same eval-mode function).

``--method tokenmatcher`` / ``--method cmag``: SRC is a ``model_best.pth.tar`` of the released
TokenMatcher or CMAG code (``{'state_dict', 'epoch', 'best_mAP'}``, ``module.`` prefixes;
``best_mAP`` a numpy scalar), read with ``weights_only=True`` allowing only numpy's float-scalar
globals, so nothing in the file runs (:mod:`model.tokenmatcher.convert`). CMAG's released
checkpoints hold exactly TokenMatcher's encoder (its training-time modules are not saved). The
encoder's K, depth, width, stem width and patch size are read off the file; DST holds it with
the config of ``configs/tokenmatcher/<dataset>.yaml`` (METHOD set to --method, PRETRAINED off)
and trailing ``KEY VALUE`` overrides (e.g. the input size or head count of a non-reference
encoder), for ``model.load_model(DST)`` and ``test.py --method tokenmatcher``.

``--method fusionreid``: SRC is a ``FusionReID_<epoch>.pth`` of the released FusionReID code, a
bare ``model.state_dict()`` (``module.`` prefixes allowed; also accepted under ``state_dict`` or
``model``), read with ``weights_only=True``. Its keys (the layout of
tests/golden/fusionreid/state_dict_keys.txt) are renamed onto this project's modules
(:func:`model.fusionreid.convert.convert_state_dict`); the ViT's ``fc``, which the released
model never calls, is dropped; a key that maps nowhere is an error. The number of classes and
of cameras (the SIE table) are read off the file; DST holds the model with the config of
``configs/fusionreid/<dataset>.yaml`` (PRETRAINED off) and trailing ``KEY VALUE`` overrides (e.g.
the sizes of a non-reference model), for ``test.py --method fusionreid``.
"""
import argparse
import importlib
import os
import re
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import build_model  # noqa: E402
from model.cmfn.cmfn import convert_released_state_dict, released_convert_options  # noqa: E402
from engine.checkpoint import file_sha256, make_checkpoint, save_checkpoint  # noqa: E402
from model.ivreid_convert import convert_reference_state, load_reference_state_dict, reference_num_classes  # noqa: E402
from model.fusionreid.convert import convert_state_dict as convert_fusionreid_state_dict  # noqa: E402
from model.tokenmatcher.convert import convert_state_dict, load_released_encoder, read_released_checkpoint  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

CMFN_DATASETS = ("sysu", "regdb", "llcm")
DATASETS = CMFN_DATASETS + ("market1501", "dukemtmc", "msmt17", "demo_market")
METHODS = ("cmfn", "ivreid", "tokenmatcher", "cmag", "fusionreid")
FUSIONREID_DATASETS = ("market1501", "dukemtmc", "msmt17", "demo_market")
OVERRIDABLE = ("tokenmatcher", "cmag", "fusionreid")
IVREID_DATASETS = ("sysu", "regdb")
TOKENMATCHER_DATASETS = ("sysu", "regdb")
# numpy's pickle reconstructors for arrays and scalars: they rebuild plain numeric data only.
NUMPY_GLOBALS = {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}
NUMPY_DTYPE_CLASS = re.compile(r"^numpy\.dtypes\.\w+DType$")


class ConversionFailed(UserError, RuntimeError):
    """SRC cannot be read or mapped onto the model; the message says why."""


def _resolve(name):
    """The object a pickled global name refers to (numpy 1 names resolve in numpy 2 too)."""
    module, attr = name.rsplit(".", 1)
    for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(candidate), attr)
        except (ImportError, AttributeError):
            continue
    raise ConversionFailed("cannot resolve the pickled global %s" % name)


def _numpy_dtype_classes():
    """numpy >= 1.25's dtype classes (``numpy.dtypes.Float64DType`` ...), which unpickling a
    dtype instantiates without the pickle naming them."""
    try:
        dtypes = importlib.import_module("numpy.dtypes")
    except ImportError:
        return []
    return [getattr(dtypes, name) for name in dir(dtypes) if NUMPY_DTYPE_CLASS.match("numpy.dtypes." + name)]


def load_released(path, unsafe=False):
    """torch.load `path` without unpickling anything but tensors, containers and numpy data."""
    if not os.path.isfile(path):
        raise ConversionFailed("source checkpoint not found: %s" % path)
    if unsafe:
        print("WARNING: --unsafe-load: unpickling %s with weights_only=False (can run code from the file)" % path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # torch raises several types for foreign pickles
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            needed = None
        if not needed:
            raise ConversionFailed("cannot read %s with weights_only=True: %s" % (path, first_error)) from None
        refused = [g for g in needed if g not in NUMPY_GLOBALS and not NUMPY_DTYPE_CLASS.match(g)]
        if refused:
            raise ConversionFailed(
                "%s stores Python objects other than tensors and numpy data (%s); refusing to unpickle "
                "them. If you trust the file, rerun with --unsafe-load (weights_only=False, which can "
                "execute code from the file), or re-save just its state dict." % (path, ", ".join(refused))
            ) from None
        allowed = [(_resolve(g), g) for g in needed] + _numpy_dtype_classes()
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(obj, path):
    """The released state dict inside a loaded file (``net`` entry or bare), ``module.`` stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("net"), dict):
        obj = obj["net"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ConversionFailed(
            "%s holds no released state dict: expected a dict of tensors or a dict with a 'net' entry, found %s"
            % (path, found)
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def convert(src, dst, dataset, num_classes=None, unsafe=False, log=print):
    """Convert `src` to `dst`; returns a summary dict (also printed through `log`)."""
    if dataset not in DATASETS:
        raise ConversionFailed("--dataset must be one of %s, got %r" % (", ".join(DATASETS), dataset))
    loaded = load_released(src, unsafe)
    released = extract_state_dict(loaded, src)
    if "classifier.weight" not in released:
        raise ConversionFailed("%s has no classifier.weight; not a released CMFN state dict" % src)
    file_classes = int(released["classifier.weight"].shape[0])
    if num_classes is not None and int(num_classes) != file_classes:
        raise ConversionFailed(
            "--num-classes %d, but %s has a classifier over %d identities" % (num_classes, src, file_classes)
        )
    cfg = build_config(dataset, opts=["MODEL.PRETRAINED", "False"])
    state, dropped, unmapped = convert_released_state_dict(
        released, cfg.MODEL.CMFN.MBUE_AFTER, **released_convert_options(cfg)
    )
    if unmapped:
        raise ConversionFailed(
            "%s: %d released keys cannot be mapped for --dataset %s (a checkpoint of another dataset's "
            "configuration?): %s" % (src, len(unmapped), dataset, "; ".join(unmapped[:8]) + (" ..." if len(unmapped) > 8 else ""))
        )
    model = build_model(cfg, file_classes)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(
        "%s %s vs %s" % (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in set(own) & set(state) if own[k].shape != state[k].shape
    )
    if missing or extra or wrong:
        parts = []
        for label, keys in (("not provided by SRC", missing), ("without a place in the model", extra), ("of the wrong shape", wrong)):
            if keys:
                parts.append("%d keys %s: %s%s" % (len(keys), label, ", ".join(keys[:6]), " ..." if len(keys) > 6 else ""))
        raise ConversionFailed("%s does not fit the %s model: %s" % (src, dataset, "; ".join(parts)))
    model.load_state_dict(state)
    meta = {
        "converted_from": os.path.basename(src),
        "source_sha256": file_sha256(src),
        "released_tensors": len(released),
        "mapped_tensors": len(state),
        "dropped_tensors": dict(sorted(dropped.items())),
    }
    if isinstance(loaded, dict) and isinstance(loaded.get("epoch"), int):
        meta["released_epoch"] = loaded["epoch"]
    save_checkpoint(dst, make_checkpoint(model.state_dict(), cfg, file_classes, meta=meta))
    log("read %d tensors from %s (%s configuration, %d classes)" % (len(released), src, dataset, file_classes))
    log("mapped %d tensors onto the model" % len(state))
    log("dropped %d released tensors (never used by the released model, or fixed constants):" % sum(dropped.values()))
    for group, count in sorted(dropped.items()):
        log("  %6d  %s" % (count, group))
    log("wrote %s" % dst)
    return meta


def ivreid_config(dataset, fold_conv_bias=False):
    """The ivreid preset of `dataset` with ImageNet loading off (the weights come from SRC)."""
    opts = ["MODEL.PRETRAINED", "False", "MODEL.IVREID.CONV_BIAS", str(not fold_conv_bias)]
    return build_config(dataset, method="ivreid", opts=opts)


def convert_ivreid(src, dst, dataset, num_classes=None, fold_conv_bias=False, log=print):
    """Convert a saved IV-REID model `src` to `dst`; returns the summary dict also printed through `log`."""
    if dataset not in IVREID_DATASETS:
        raise ConversionFailed("--method ivreid: --dataset must be one of %s, got %r"
                               % (", ".join(IVREID_DATASETS), dataset))
    try:
        reference = load_reference_state_dict(src)
    except UserError as exc:  # the message names the file
        raise ConversionFailed(str(exc)) from None
    try:
        file_classes = reference_num_classes(reference)
        if num_classes is not None and int(num_classes) != file_classes:
            raise ConversionFailed("--num-classes %d, but the file has a classifier over %d identities"
                                   % (num_classes, file_classes))
        cfg = ivreid_config(dataset, fold_conv_bias)
        state, info = convert_reference_state(reference, cfg)
    except (UserError, ConversionFailed) as exc:
        raise ConversionFailed("%s: %s" % (src, exc)) from None
    meta = {
        "converted_from": os.path.basename(src),
        "source_sha256": file_sha256(src),
        "released_tensors": len(reference),
        "mapped_tensors": info["mapped"],
        "folded_conv_biases": info["folded_conv_biases"],
        "initialised_tensors": info["initialised"],
    }
    save_checkpoint(dst, make_checkpoint(state, cfg, file_classes, meta=meta))
    log("read %d tensors from %s (IV-REID, %s, %d classes)" % (len(reference), src, dataset, file_classes))
    log("mapped %d tensors onto the model" % info["mapped"])
    if info["folded_conv_biases"]:
        log("folded %d conv biases into the BN running means" % info["folded_conv_biases"])
    log("initialised %d tensors of the auxiliary modality classifiers (absent from the file)"
        % len(info["initialised"]))
    log("wrote %s" % dst)
    return meta


def _encoder_geometry(mapped, info):
    """MODEL.TOKENMATCHER overrides for the encoder of a converted state dict."""
    stem = mapped["stems.visible.conv.0.weight"]
    proj = mapped["stems.visible.proj.weight"]
    values = {"NUM_TOKENS": info["num_tokens"], "DEPTH": info["depth"], "EMBED_DIM": info["embed_dim"],
              "STEM_WIDTH": int(stem.shape[0]), "PATCH_SIZE": 2 * int(proj.shape[-1])}
    return [x for key, value in values.items() for x in ("MODEL.TOKENMATCHER." + key, str(value))]


def convert_tokenmatcher(src, dst, dataset, method="tokenmatcher", opts=(), log=print):
    """Convert a released TokenMatcher / CMAG `src` to `dst`; returns the summary dict also printed through `log`."""
    if dataset not in TOKENMATCHER_DATASETS:
        raise ConversionFailed("--method %s: --dataset must be one of %s, got %r"
                               % (method, ", ".join(TOKENMATCHER_DATASETS), dataset))
    try:
        released = read_released_checkpoint(src)
        mapped, info = convert_state_dict(released["state_dict"])
        cfg = build_config(dataset, method="tokenmatcher", opts=["METHOD", method, "MODEL.PRETRAINED", "False"]
                           + _encoder_geometry(mapped, info) + list(opts))
        model = build_model(cfg, 1)
        info = load_released_encoder(model, src)
    except UserError as exc:  # the message names the file or key
        raise ConversionFailed(str(exc)) from None
    meta = {
        "converted_from": os.path.basename(src),
        "source_sha256": file_sha256(src),
        "released_tensors": len(released["state_dict"]),
        "mapped_tensors": len(mapped),
        "dropped_tensors": len(info["dropped"]),
        "released_epoch": info["epoch"],
        "released_best_mAP": info["best_mAP"],
    }
    save_checkpoint(dst, make_checkpoint(model.state_dict(), cfg, 1, meta=meta))
    log("read %d tensors from %s (%s, %s, K=%d tokens, depth %d, width %d)" % (
        len(released["state_dict"]), src, method, dataset, info["num_tokens"], info["depth"], info["embed_dim"]))
    log("mapped %d tensors onto the encoder; dropped %d that the released model never runs (its original last "
        "block and norm, the unused BatchNorm template)" % (len(mapped), len(info["dropped"])))
    if info["epoch"] is not None:
        log("released epoch %s, best mAP %s" % (info["epoch"], info["best_mAP"]))
    log("wrote %s" % dst)
    return meta


def convert_fusionreid(src, dst, dataset, opts=(), log=print):
    """Convert a released FusionReID state dict `src` to `dst`; returns the summary dict also printed through `log`."""
    if dataset not in FUSIONREID_DATASETS:
        raise ConversionFailed("--method fusionreid: --dataset must be one of %s, got %r"
                               % (", ".join(FUSIONREID_DATASETS), dataset))
    try:
        loaded = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's messages name the offending global
        raise ConversionFailed("cannot read %s as a state dict of tensors (torch.load weights_only=True): %s"
                               % (src, exc)) from None
    if isinstance(loaded, dict):
        loaded = loaded.get("state_dict", loaded.get("model", loaded))
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConversionFailed("%s does not hold a FusionReID state dict (a dict of tensors)" % src)
    state, report = convert_fusionreid_state_dict(loaded)
    if report["unmapped"]:
        raise ConversionFailed("%s: %d keys are not FusionReID keys: %s%s" % (
            src, len(report["unmapped"]), ", ".join(report["unmapped"][:6]), " ..." if len(report["unmapped"]) > 6
            else ""))
    if "heads.cnn.classifier.weight" not in state:
        raise ConversionFailed("%s has no resnet.classifier.weight: not a FusionReID training checkpoint" % src)
    num_classes = int(state["heads.cnn.classifier.weight"].shape[0])
    cameras = int(state["vit.sie_embed"].shape[0]) if "vit.sie_embed" in state else 0
    cfg = build_config(dataset, method="fusionreid", opts=["MODEL.PRETRAINED", "False", "MODEL.FUSIONREID.NUM_CAMERAS",
                                                           str(cameras)] + list(opts))
    model = build_model(cfg, num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConversionFailed("%s does not fit the %s FusionReID model (override its sizes with KEY VALUE): %s%s" % (
            src, dataset, "missing " + ", ".join(missing[:6]) if missing else "",
            "; unexpected " + ", ".join(unexpected[:6]) if unexpected else ""))
    meta = {"converted_from": os.path.basename(src), "source_sha256": file_sha256(src),
            "released_tensors": len(loaded), "mapped_tensors": report["converted"],
            "dropped_tensors": len(report["dropped"])}
    save_checkpoint(dst, make_checkpoint(model.state_dict(), cfg, num_classes, meta=meta))
    log("read %d tensors from %s (FusionReID, %s, %d classes, %d cameras)" % (len(loaded), src, dataset, num_classes,
                                                                             cameras))
    log("mapped %d tensors onto the model; dropped %d that the released model never uses (%s)" % (
        report["converted"], len(report["dropped"]), ", ".join(report["dropped"])))
    log("wrote %s" % dst)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint saved by the released code (.t / .pth)")
    parser.add_argument("dst", help="output checkpoint of this project")
    parser.add_argument("--method", default="cmfn", choices=METHODS, help="code that saved SRC (default cmfn)")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="configuration the model was trained in")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="tokenmatcher/cmag/fusionreid: config overrides of DST's model (e.g. INPUT.SIZE_TRAIN "
                             "[64,32])")
    parser.add_argument("--num-classes", type=int, help="expected classifier size (checked against SRC)")
    parser.add_argument(
        "--unsafe-load", action="store_true",
        help="unpickle SRC with weights_only=False (runs any code in the file; only for trusted files)",
    )
    parser.add_argument(
        "--fold-conv-bias", action="store_true",
        help="ivreid: a model without conv biases (MODEL.IVREID.CONV_BIAS False), biases folded into the BNs",
    )
    args = parser.parse_intermixed_args(argv)
    if args.opts and args.method not in OVERRIDABLE:
        parser.error("KEY VALUE overrides apply to --method %s" % ", ".join(OVERRIDABLE))
    if args.method == "fusionreid" and (args.unsafe_load or args.fold_conv_bias or args.num_classes):
        parser.error("--unsafe-load, --fold-conv-bias and --num-classes do not apply to --method fusionreid (the "
                     "file is read with weights_only=True; classes and cameras are read off it)")
    if args.method in ("tokenmatcher", "cmag") and (args.unsafe_load or args.fold_conv_bias or args.num_classes):
        parser.error("--unsafe-load, --fold-conv-bias and --num-classes do not apply to --method %s (the file is read "
                     "without unpickling code; the encoder has no classifier)" % args.method)
    if args.method == "ivreid" and args.unsafe_load:
        parser.error("--unsafe-load applies to --method cmfn; IV-REID files are read by a restricted unpickler")
    if args.method == "cmfn" and args.dataset not in CMFN_DATASETS:
        parser.error("--method cmfn: --dataset must be one of %s" % ", ".join(CMFN_DATASETS))
    if args.method == "cmfn" and args.fold_conv_bias:
        parser.error("--fold-conv-bias applies to --method ivreid")
    try:
        if args.method == "fusionreid":
            convert_fusionreid(args.src, args.dst, args.dataset, args.opts)
        elif args.method in ("tokenmatcher", "cmag"):
            convert_tokenmatcher(args.src, args.dst, args.dataset, args.method, args.opts)
        elif args.method == "ivreid":
            convert_ivreid(args.src, args.dst, args.dataset, args.num_classes, args.fold_conv_bias)
        else:
            convert(args.src, args.dst, args.dataset, args.num_classes, args.unsafe_load)
    except ConversionFailed as exc:
        parser.exit(2, "error: %s\n" % exc)


if __name__ == "__main__":
    sys.exit(run_cli(main))
