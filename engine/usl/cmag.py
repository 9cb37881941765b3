"""CMAG's stage-2 step for the unsupervised engine (``METHOD cmag``).

The stage-2 iteration of CMAG's released trainer on top of TokenMatcher's: the RGB [B_r, D]
and IR [B_i, D] batch features of the encoder (D = K * C) go through CMAG's modules
(:class:`model.cmag.modules.CMAGModules`: the cross-modal attention in both directions, a
labelled reconstruction, then the graph memory on the RGB batch and then on the IR batch, or
the circular memory), TokenMatcher's stage-2 losses run on the enhanced features (the
diversity loss on the raw tokens) and, with a circular memory, the weighted circular term is
added (:class:`loss.cmag.CMAGStage2Loss`). After every optimiser step the EMA teacher
(:class:`model.cmag.ema.EMATeacher`, started from the stage's starting weights) moves towards
the encoder; as released it never feeds the loss, and ``USL.CMAG.EVAL_WITH_EMA`` makes stage 2
evaluate and select with it.

The modules' parameters form their own optimiser group (lr factor ``USL.CMAG.LR_FACTOR``).
Under DDP they stay outside the wrapped model: every process computes the loss of the same
gathered global batch, so their gradients and the memory writes agree without a reduction.
The resumable state holds the modules' parameters and buffers (the memory FIFO and its
pointer, the attention gate) and every tensor of the teacher.
"""
import math

import torch

from engine.usl.epoch import STAGE2_STEPS, stage2_lookup
from loss.cmag import CMAGStage2Loss
from loss.tokenmatcher import Stage2Loss
from model.cmag.ema import EMATeacher
from model.cmag.modules import CMAGModules
from utils.errors import ConfigError


@STAGE2_STEPS.register("cmag")
class CMAGStage2:
    """CMAG's stage-2 step (module docstring), with the interface of
    :class:`engine.usl.epoch.TokenMatcherStage2`."""

    def __init__(self, cfg, model):
        self.cfg = cfg
        self.model = model
        device = next(model.parameters()).device
        self.modules = CMAGModules.from_config(cfg, model.feat_dim, model.num_tokens).to(device)
        self.loss = CMAGStage2Loss.from_config(cfg, Stage2Loss.from_config(cfg), self.modules)
        self.ema = None

    def describe(self):
        lines = ["CMAG stage 2: " + line for line in self.modules.describe()]
        cmag = self.cfg.USL.CMAG
        lines.append("CMAG stage 2: EMA teacher alpha %g over the parameters%s, %s" % (
            cmag.EMA_ALPHA, " and buffers" if cmag.EMA_SYNC_BUFFERS else " (buffers kept, as released)",
            "evaluated and selected instead of the encoder" if cmag.EVAL_WITH_EMA
            else "never used by the loss or the evaluation (as released)"))
        if self.modules.circular_memory is not None:
            lines.append("CMAG stage 2: circular term weight %g, temperature %g"
                         % (self.loss.lambda_graph, self.loss.temperature))
        return lines

    def start(self, model):
        self.modules.train()
        self.ema = EMATeacher.from_config(self.cfg, model)

    def param_groups(self):
        return self.modules.param_groups()

    def __call__(self, epoch, labelled, f_ir, f_rgb, batch_ir, batch_rgb, tokens_ir, tokens_rgb):
        total, terms, info = self.loss(epoch, labelled.memories, labelled.match, f_ir, f_rgb, batch_ir["pids"],
                                       batch_rgb["pids"], tokens_ir, tokens_rgb,
                                       **stage2_lookup(labelled, batch_ir, batch_rgb))
        circular = terms.get("circular")
        if self.cfg.USL.CMAG.CIRCULAR == "as_compiled" and circular is not None and not math.isfinite(circular):
            raise ConfigError("USL.CMAG.CIRCULAR as_compiled: the released circular loss has no negatives and is "
                              "%s with two or more labels in a batch, as here; use 'fixed' (this project's working "
                              "variant) or 'off'" % circular)
        return total, terms, info

    def after_step(self, model):
        self.ema.update(model)

    def evaluation_model(self, model):
        return self.ema.evaluation_model(model) if self.ema is not None else model

    def state_dict(self):
        return {"modules": self.modules.state_dict(), "ema": self.ema.module.state_dict()}

    def load_state_dict(self, state):
        self.modules.load_state_dict(state["modules"])
        self.modules.train()
        self.ema = EMATeacher.from_config(self.cfg, self.model)
        with torch.no_grad():
            self.ema.module.load_state_dict(state["ema"])
