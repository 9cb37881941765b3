"""Baseline: the CMFN backbone and head without HCE, MFA and MBUE (the CMFN ablation baseline).

Visible and infrared stems, shared ResNet stages, GAP, BNNeck, classifier: a two-stream
ResNet in the AGW/DEEN style. It runs the same stages as the CMFN of the same config
(``layer1..layer4``, or ``layer1..layer3`` when ``MODEL.CMFN.MBUE_AFTER`` is ``layer2`` as on
RegDB), so its features have the CMFN's width and the two models differ only in the CMFN
modules. One copy per image and no orthogonality loss (``ort`` is 0), so the CMFN criterion
trains it with the same recipe.

Train: ``model(images [N,3,H,W], modality [N]) -> {"pool": [N, D], "logits": [N, C],
"ort": 0-d zero}``. Eval: ``{"pool_orig", "bn_orig"}``, each [N, D] L2-normalised; the
presets of the CMFN over these two sets.
"""
from model.backbones.resnet import build_backbone, num_stages_for
from model.base import ReIDModel
from model.cmfn.cmfn import SET_NAMES, embedding_presets, eval_sets
from model.heads import BNNeckHead
from model.registry import MODELS


@MODELS.register("baseline")
class Baseline(ReIDModel):
    num_copies = 1
    train_outputs = ("pool", "logits", "ort")
    embedding_sets = SET_NAMES[:2]
    embedding_presets = embedding_presets(SET_NAMES[:2])
    default_embedding = "sum6"

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.stage_channels[backbone.num_stages]
        self.head = BNNeckHead(self.feat_dim, num_classes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return cls(build_backbone(cfg, num_stages_for(cfg)), num_classes)

    def forward(self, images, modality, camids=None):
        x = self.backbone.stem_rows(images, modality)
        for stage in self.backbone.stages():
            x = stage(x)
        pool, bn = self.head(x)
        if self.training:
            return {"pool": pool, "logits": self.head.classify(bn), "ort": pool.new_zeros(())}
        return eval_sets(pool, bn, self.embedding_sets)
