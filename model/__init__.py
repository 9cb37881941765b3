"""Model factory: ``build_model(cfg, num_classes)`` and ``load_model(path)``.

``MODELS`` (:mod:`model.registry`) maps ``cfg.MODEL.NAME`` to a model class following the
contract of :mod:`model.base`; a class registers itself with ``@MODELS.register("name")``.
"""
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.distributed import unwrap_model
from model.base import ReIDModel
from model.registry import MODELS
from utils.config import config_from_string
from utils.errors import ConfigError


def build_model(cfg, num_classes):
    """The model named by ``cfg.MODEL.NAME`` with a classifier over `num_classes` identities."""
    cls = MODELS.get(cfg.MODEL.NAME)
    if int(num_classes) < 1:
        raise ConfigError("num_classes must be positive, got %r" % (num_classes,))
    return cls.from_config(cfg, int(num_classes))


def _strip_wrapper_prefix(state):
    """Keys saved from a DDP (``module.``) or torch.compile (``_orig_mod.``) wrapper, unwrapped."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_model(path, map_location="cpu"):
    """Rebuild the model stored in a checkpoint of this project, in eval mode.

    The architecture comes from the checkpoint's config (ImageNet loading switched off, the
    weights are in the file; configs of earlier versions are renamed as on load). The model
    gets a ``cfg`` attribute holding that config.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        cfg = config_from_string(ckpt["config"], source="checkpoint %s" % path)
    except ConfigError as exc:
        raise CheckpointError("checkpoint %s: its config does not fit this version: %s" % (path, exc)) from None
    cfg.MODEL.PRETRAINED = False
    cfg.freeze()
    model = build_model(cfg, ckpt["num_classes"])
    state = _strip_wrapper_prefix(ckpt["model"])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                problems.append("%d %s (%s%s)" % (len(keys), label, ", ".join(keys[:5]), ", ..." if len(keys) > 5 else ""))
        raise CheckpointError(
            "checkpoint %s does not match the %s model its config describes: %s"
            % (path, cfg.MODEL.NAME, "; ".join(problems))
        )
    model.load_state_dict(state)
    model.cfg = cfg
    return model.eval()


__all__ = ["MODELS", "ReIDModel", "build_model", "load_model", "unwrap_model"]
