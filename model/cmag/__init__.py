"""CMAG's training-time modules (cross-modal attention reconstruction, graph memories, EMA teacher).

CMAG trains the TokenMatcher encoder (:mod:`model.tokenmatcher`) with these modules added in
stage 2; none of them is part of the evaluated model. :class:`CMAGModules` holds the ones the
loss runs through, :class:`EMATeacher` the moving-average copy of the encoder.
"""
from model.cmag.circular import (CircularGraphConv, CircularGraphMemory, circular_contrastive_loss,
                                 circular_contrastive_loss_fixed)
from model.cmag.cross_modal_attention import CrossModalAttention
from model.cmag.ema import EMATeacher
from model.cmag.graph_memory import GraphMemoryEnhancement
from model.cmag.modules import CMAGModules

__all__ = ["CMAGModules", "CircularGraphConv", "CircularGraphMemory", "CrossModalAttention", "EMATeacher",
           "GraphMemoryEnhancement", "circular_contrastive_loss", "circular_contrastive_loss_fixed"]
