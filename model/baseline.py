"""Baseline: the CMFN backbone and head without HCE, MFA and MBUE (issue item 7).

Visible and infrared stems, shared ResNet stages, GAP, BNNeck, classifier: a two-stream
ResNet in the AGW/DEEN style. It runs the same stages as the CMFN of the same config
(``layer1..layer4``, or ``layer1..layer3`` when ``MODEL.MBUE_AFTER`` is ``layer2`` as on
RegDB), so its features have the CMFN's width and the two models differ only in the CMFN
modules. One copy per image (``num_copies`` 1) and no orthogonality loss.

Train: ``model(x_vis [B,3,H,W], x_ir [B,3,H,W]) -> (pool [2B,D], logits [2B,C], 0-d zero)``,
rows [visible; infrared]. Eval: ``model(x [N,3,H,W], modality) -> (pool, bn)`` [N, D] each,
L2-normalised.
"""
import torch.nn.functional as F
from torch import nn

from model.backbone import build_backbone, num_stages_for
from model.head import BNNeckHead


class Baseline(nn.Module):
    num_copies = 1

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.stage_channels[backbone.num_stages]
        self.head = BNNeckHead(self.feat_dim, num_classes)

    def forward(self, x, x_ir=None, modality="visible"):
        x = self.backbone.stem_input(x, x_ir, modality)
        for stage in self.backbone.stages():
            x = stage(x)
        pool, bn = self.head(x)
        if self.training:
            return pool, self.head.classify(bn), pool.new_zeros(())
        return F.normalize(pool, dim=1), F.normalize(bn, dim=1)


def build_baseline(cfg, num_classes):
    return Baseline(build_backbone(cfg, num_stages_for(cfg)), num_classes)
