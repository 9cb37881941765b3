"""CMAG's training-time modules on top of the TokenMatcher encoder, in one container.

:class:`CMAGModules` holds what CMAG's stage-2 trainer applies to the pooled batch features
[B, D] (D = K * C, the encoder's concatenated BN tokens) between the encoder and the memory
losses, and :meth:`CMAGModules.enhance` applies it in the released order:

1. ``cma`` (:class:`~model.cmag.cross_modal_attention.CrossModalAttention`, a labelled
   reconstruction): f_rgb' = cma(f_rgb, f_ir) and f_ir' = cma(f_ir, f_rgb), both from the
   un-attended features; None means the identity;
2. ``circular_memory`` (:class:`~model.cmag.circular.CircularGraphMemory`) if present:
   (f_rgb'', f_ir'') = circular_memory(f_rgb', f_ir', y_rgb, y_ir); otherwise ``graph_memory``
   (:class:`~model.cmag.graph_memory.GraphMemoryEnhancement`) if present: f_rgb'' = G(f_rgb'),
   then f_ir'' = G(f_ir'), one module (one memory) for both modalities, labels not passed;
   otherwise the identity.

The modules run in their parameters' dtype (float32 or float64) with autocast off, as the
released modules ran in float32. None of them is used at evaluation, and the encoder's
checkpoint layout is unchanged: ``state_dict()`` of this container holds their parameters
(the attention gate included) and the memories' buffers (features, pointer), for resuming.
The EMA teacher (:mod:`model.cmag.ema`) is separate, since it holds a copy of the encoder.
"""
import torch
from torch import nn

from model.cmag.circular import VARIANTS, CircularGraphMemory
from model.cmag.cross_modal_attention import MODES, CrossModalAttention
from model.cmag.graph_memory import GraphMemoryEnhancement
from utils.errors import ConfigError

CIRCULAR_MODES = ("off",) + VARIANTS


class CMAGModules(nn.Module):
    """The cross-modal attention and the graph memory of CMAG's stage 2 (module docstring)."""

    def __init__(self, cma=None, graph_memory=None, circular_memory=None, lr_factor=1.0):
        super().__init__()
        self.lr_factor = float(lr_factor)
        self.cma = cma
        self.graph_memory = graph_memory
        self.circular_memory = circular_memory

    @classmethod
    def build(cls, feature_dim, num_tokens, cma=True, cma_mode="token", cma_heads=8, cma_gate_init=0.0,
              graph_memory=True, graph_hidden_dim=512, graph_memory_size=2048, graph_neighbours=10,
              circular="off", lr_factor=1.0):
        """The modules for D = `feature_dim` features of `num_tokens` tokens. A `circular` mode
        other than "off" builds the circular memory, which takes the graph memory's place as
        in the released trainer, with the same sizes."""
        if circular not in CIRCULAR_MODES:
            raise ValueError("circular mode must be one of %s, got %r" % (", ".join(CIRCULAR_MODES), circular))
        attention = (CrossModalAttention(feature_dim, num_tokens, mode=cma_mode, num_heads=cma_heads,
                                         gate_init=cma_gate_init) if cma else None)
        if lr_factor < 0:
            raise ValueError("the lr factor must be >= 0, got %r" % (lr_factor,))
        sizes = dict(hidden_dim=graph_hidden_dim, memory_size=graph_memory_size, num_neighbours=graph_neighbours)
        if circular != "off":
            return cls(attention, None, CircularGraphMemory(feature_dim, variant=circular, **sizes), lr_factor)
        return cls(attention, GraphMemoryEnhancement(feature_dim, **sizes) if graph_memory else None, None, lr_factor)

    @classmethod
    def from_config(cls, cfg, feature_dim, num_tokens):
        """From ``USL.CMAG.*`` (the keys read here); errors name the key."""
        cmag = cfg.USL.CMAG
        choices = {"CMA_MODE": MODES, "CIRCULAR": CIRCULAR_MODES}
        for key, allowed in choices.items():
            if getattr(cmag, key) not in allowed:
                raise ConfigError("USL.CMAG.%s must be one of %s, got %r"
                                  % (key, ", ".join(allowed), getattr(cmag, key)))
        for key in ("CMA_HEADS", "GRAPH_HIDDEN_DIM", "GRAPH_MEMORY_SIZE", "GRAPH_NEIGHBOURS"):
            if not isinstance(getattr(cmag, key), int) or getattr(cmag, key) < 1:
                raise ConfigError("USL.CMAG.%s must be a positive integer, got %r" % (key, getattr(cmag, key)))
        width = feature_dim // num_tokens if cmag.CMA_MODE == "token" else feature_dim
        if cmag.CMA and width % cmag.CMA_HEADS:
            raise ConfigError("USL.CMAG.CMA_HEADS (%d) must divide the attended width %d (%s mode)"
                              % (cmag.CMA_HEADS, width, cmag.CMA_MODE))
        try:
            return cls.build(feature_dim, num_tokens, cma=cmag.CMA, cma_mode=cmag.CMA_MODE, cma_heads=cmag.CMA_HEADS,
                             cma_gate_init=cmag.CMA_GATE_INIT, graph_memory=cmag.GRAPH_MEMORY,
                             graph_hidden_dim=cmag.GRAPH_HIDDEN_DIM, graph_memory_size=cmag.GRAPH_MEMORY_SIZE,
                             graph_neighbours=cmag.GRAPH_NEIGHBOURS, circular=cmag.CIRCULAR,
                             lr_factor=cmag.LR_FACTOR)
        except ValueError as exc:
            raise ConfigError("USL.CMAG: %s" % exc) from exc

    def _dtype(self):
        for param in self.parameters():
            return param.dtype
        return None

    def enhance(self, f_rgb, f_ir, labels_rgb=None, labels_ir=None):
        """(f_rgb'', f_ir'') of the RGB [B_r, D] and IR [B_i, D] features (module docstring);
        the labels are needed only by the circular memory."""
        dtype = self._dtype()
        if dtype is None:
            return f_rgb, f_ir
        with torch.autocast(device_type=f_rgb.device.type, enabled=False):
            f_rgb, f_ir = f_rgb.to(dtype), f_ir.to(dtype)
            if self.cma is not None:
                f_rgb, f_ir = self.cma(f_rgb, f_ir), self.cma(f_ir, f_rgb)
            if self.circular_memory is not None:
                if labels_rgb is None or labels_ir is None:
                    raise ValueError("the circular memory needs the pseudo labels of both modalities")
                return self.circular_memory(f_rgb, f_ir, labels_rgb, labels_ir)
            if self.graph_memory is not None:
                f_rgb = self.graph_memory(f_rgb)
                f_ir = self.graph_memory(f_ir)
            return f_rgb, f_ir

    def graph_fill(self):
        """The filled fraction of the active memory (graph or circular), 0.0 without one."""
        memory = self.circular_memory if self.circular_memory is not None else self.graph_memory
        return memory.fill_level() if memory is not None else 0.0

    def monitor(self):
        """Plain floats for the training log: ``graph_fill``, with the attention ``cma_gate``, and
        with the graph memory ``graph_top1_not_self`` (nodes of its last graph whose assumed self
        was another node)."""
        values = {"graph_fill": self.graph_fill()}
        if self.graph_memory is not None:
            values["graph_top1_not_self"] = float(self.graph_memory.last_top1_not_self)
        if self.cma is not None:
            values["cma_gate"] = self.cma.gate_value()
        return values

    def describe(self):
        """Lines saying which parts are recovered from the authors' code and which are this project's."""
        lines = []
        if self.cma is not None:
            lines.append(self.cma.describe())
        if self.graph_memory is not None:
            lines.append("graph_memory: CMAG's GraphMemoryEnhancement as released (%s; hidden_dim and memory_size "
                         "are this project's choice)" % self.graph_memory.extra_repr())
        if self.circular_memory is not None:
            state = ("as released, which cannot train" if self.circular_memory.variant == "as_compiled"
                     else "this project's working variant")
            lines.append("circular_memory: CMAG's circular graph memory, %s (%s)"
                         % (state, self.circular_memory.extra_repr()))
        return lines

    def param_groups(self):
        """One optimiser group ("cmag", ``lr_factor``) of every trainable parameter; [] without any."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"name": "cmag", "params": params, "lr_factor": self.lr_factor}] if params else []
