"""CMAG's stage-2 loss: TokenMatcher's stage-2 losses on enhanced features, plus the circular term.

One stage-2 batch of the encoder's outputs (IR ``f_ir`` [B_i, D], RGB ``f_rgb`` [B_r, D], their
pseudo labels, the raw class tokens) goes through:

1. the CMAG modules (:meth:`model.cmag.modules.CMAGModules.enhance`): the cross-modal attention
   in both directions on the pooled features, then the graph memory on the RGB batch and then
   on the IR batch (or the circular memory on both);
2. the TokenMatcher stage-2 loss on the enhanced features f'' (the memories, the neighbour and
   cross terms, the mate term) while the diversity loss keeps the raw tokens. It is any callable
   with the signature and return value of :class:`loss.tokenmatcher.Stage2Loss`::

       stage2_loss(epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb, tokens_ir, tokens_rgb,
                   **lookup) -> (total 0-d tensor, terms {name: float, "total": float}, info {name: float})

3. with a circular memory and ``lambda_graph`` > 0, the circular term, added as
   ``lambda_graph * circular``::

       circular = circ(f_rgb'', y_rgb) + circ(f_ir'', y_ir)
                  + circ(cat(f_rgb''[rows with a partner], f_ir''), cat(partner IR labels, y_ir))

   (the last part when there is a cluster match), with circ the as-compiled loss (NaN with two
   or more labels; its cross part builds the partners as a tensor of r2i's values, which fails in
   the mirror branch, where they are lists) or the fixed one, by the circular memory's variant.

The graph memory has no loss of its own. The returned ``terms`` add ``circular`` (when computed)
and their ``total`` is the new total; ``info`` adds the modules' monitoring values
(``graph_fill``, ``cma_gate``, ...) and, with a circular memory, ``lambda_graph``, as floats.
"""
import torch

from model.cmag.circular import circular_contrastive_loss, circular_contrastive_loss_fixed
from utils.errors import ConfigError


class CMAGStage2Loss:
    """CMAG's stage-2 total (module docstring) around `stage2_loss`, with the modules `modules`
    (:class:`~model.cmag.modules.CMAGModules`), ``lambda_graph`` and the circular loss
    ``temperature``."""

    def __init__(self, stage2_loss, modules, lambda_graph=0.1, temperature=0.07):
        self.stage2_loss = stage2_loss
        self.modules = modules
        self.lambda_graph = float(lambda_graph)
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, cfg, stage2_loss, modules):
        """From ``USL.CMAG.CIRCULAR_WEIGHT`` and ``USL.CMAG.CIRCULAR_TEMPERATURE``."""
        return cls(stage2_loss, modules, lambda_graph=cfg.USL.CMAG.CIRCULAR_WEIGHT,
                   temperature=cfg.USL.CMAG.CIRCULAR_TEMPERATURE)

    def _enhance(self, f_ir, f_rgb, labels_ir, labels_rgb):
        memory = self.modules.circular_memory
        try:
            f_rgb, f_ir = self.modules.enhance(f_rgb, f_ir, labels_rgb, labels_ir)
        except RuntimeError as exc:
            if memory is None or memory.variant != "as_compiled" or "must match the size" not in str(exc):
                raise
            raise ConfigError("USL.CMAG.CIRCULAR as_compiled: the released circular memory cannot run once it "
                              "holds rows (its label mask covers the batch only: %s); use 'fixed' or 'off'"
                              % exc) from exc
        return f_ir, f_rgb

    def circular(self, f_ir, f_rgb, labels_ir, labels_rgb, match=None):
        """The unweighted circular term of the enhanced features (module docstring): 0-d."""
        fixed = self.modules.circular_memory.variant == "fixed"
        loss = circular_contrastive_loss_fixed if fixed else circular_contrastive_loss
        labels_ir = torch.as_tensor(labels_ir, dtype=torch.int64, device=f_ir.device)
        labels_rgb = torch.as_tensor(labels_rgb, dtype=torch.int64, device=f_rgb.device)
        total = loss(f_rgb, labels_rgb, self.temperature) + loss(f_ir, labels_ir, self.temperature)
        if match is None or not match.r2i or not match.i2r:
            return total
        rows = [row for row, label in enumerate(labels_rgb.tolist()) if label in match.r2i]
        if not fixed and match.mirror:
            raise ConfigError("USL.CMAG.CIRCULAR as_compiled: the released cross-modal circular term makes a "
                              "tensor of r2i's values, which are lists in the mirror branch (fewer RGB than IR "
                              "clusters); use 'fixed'")
        partners = [match.rgb_to_ir(label) for label in labels_rgb[rows].tolist()]
        features = torch.cat([f_rgb[torch.tensor(rows, dtype=torch.int64, device=f_rgb.device)], f_ir])
        labels = torch.cat([torch.tensor(partners, dtype=torch.int64, device=f_ir.device), labels_ir])
        return total + loss(features, labels, self.temperature)

    def __call__(self, epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb, tokens_ir, tokens_rgb, **lookup):
        """Total, terms and info of one CMAG stage-2 batch; `lookup` goes to the stage-2 loss
        unchanged (neighbour lists, the rows' image indexes or camera ids)."""
        f_ir, f_rgb = self._enhance(f_ir, f_rgb, labels_ir, labels_rgb)
        total, terms, info = self.stage2_loss(epoch, memories, match, f_ir, f_rgb, labels_ir, labels_rgb,
                                              tokens_ir, tokens_rgb, **lookup)
        terms, info = dict(terms), dict(info, **self.modules.monitor())
        if self.modules.circular_memory is not None:
            info["lambda_graph"] = self.lambda_graph
            if self.lambda_graph > 0:
                circular = self.circular(f_ir, f_rgb, labels_ir, labels_rgb, match)
                total = total + self.lambda_graph * circular
                terms["circular"] = float(circular.detach())
                terms["total"] = float(total.detach())
        return total, terms, info
