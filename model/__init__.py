"""Model factory: ``build_model(cfg, num_classes)`` and ``load_model(path)``.

``MODELS`` maps ``cfg.MODEL.NAME`` to a builder ``(cfg, num_classes) -> nn.Module``; register
new models with :func:`register_model`. Every model follows one contract (CONTRACTS.md):

* attributes ``num_copies`` (rows per image: 3 for CMFN, 1 for the baseline), ``feat_dim``
  (pooled feature width D) and ``head`` (BNNeck + classifier, trained at the full LR);
* train mode: ``model(x_vis [B,3,H,W], x_ir [B,3,H,W]) -> (pool [copies*2B, D] pre-BN,
  logits [copies*2B, C], loss_ort 0-d)``, rows [vis, ir] per copy, copies in order;
* eval mode: ``model(x [N,3,H,W], modality="visible"|"infrared") -> (pool, bn)``, each
  [copies*N, D], L2-normalised, copies in blocks of N.
"""
from model.baseline import Baseline, build_baseline
from model.cmfn import CMFN, build_cmfn
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import ConfigError, config_from_string

MODELS = {
    "cmfn": build_cmfn,
    "baseline": build_baseline,
}


def register_model(name):
    """Decorator adding a builder ``(cfg, num_classes) -> nn.Module`` to :data:`MODELS`."""

    def add(builder):
        if name in MODELS:
            raise ValueError("model %r is already registered" % name)
        MODELS[name] = builder
        return builder

    return add


def build_model(cfg, num_classes):
    """The model named by ``cfg.MODEL.NAME`` with a classifier over `num_classes` identities."""
    name = cfg.MODEL.NAME
    if name not in MODELS:
        raise ConfigError("MODEL.NAME %r is not a registered model (available: %s)" % (name, ", ".join(sorted(MODELS))))
    if int(num_classes) < 1:
        raise ValueError("num_classes must be positive, got %r" % (num_classes,))
    return MODELS[name](cfg, int(num_classes))


def _strip_wrapper_prefix(state):
    """Keys saved from a DDP (``module.``) or torch.compile (``_orig_mod.``) wrapper, unwrapped."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_model(path, map_location="cpu"):
    """Rebuild the model stored in a checkpoint of this project, in eval mode.

    The architecture comes from the checkpoint's config (ImageNet loading switched off, the
    weights are in the file). The model gets a ``cfg`` attribute holding that config.
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


__all__ = ["MODELS", "CMFN", "Baseline", "build_model", "load_model", "register_model"]
