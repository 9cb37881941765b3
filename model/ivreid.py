"""IV-REID: a single-stream ResNet with a BNNeck, a shared classifier and two modality classifiers.

Visible and infrared images go through the same network; the model is never told the
modality (``modality`` and ``camids`` are accepted and ignored). For N images [N, 3, H, W]
and C identities, with D the backbone width (2048 for ResNet-50, 512 for ResNet-18):

1. backbone (:class:`model.backbones.single_stream.SingleStreamResNet`): [N, D, H/16, W/16]
   at last stride 1;
2. ``pool``: global average pooling, [N, D] (pre-BN);
3. ``feat``: BNNeck (BatchNorm1d, PyTorch's default init, trainable bias), [N, D];
4. ``logits``: classifier with a bias (kaiming-normal fan_out weight, bias 0), [N, C];
5. ``aux_logits_visible`` / ``aux_logits_infrared``: two independent modality classifiers
   (``aux_visible``, ``aux_infrared``), each BatchNorm1d(D) -> Linear(D, A) -> Linear(A, C)
   with no activation in between (an affine map of rank <= A after its BN; linears
   kaiming-normal fan_out, biases 0). Both run on the post-BN ``feat`` of every row, not
   detached, so what the criterion makes of them (each head's CE on its own modality's rows,
   a pull towards the other head on those rows) trains the backbone and BNNeck as well. In
   train mode each head's BN normalises over the whole batch, both modalities together.

Train mode returns ``{"pool", "feat", "logits", "aux_logits_visible", "aux_logits_infrared"}``,
all with N rows in batch order. Eval mode returns the L2-normalised embeddings
``{"bn": feat, "pool": pool}``, [N, D] each; the classifiers are not used at test time.

The released network's choices are the defaults of the config: a bias on every backbone conv
(``MODEL.IVREID.CONV_BIAS``), no ReLU after the stem BN (``MODEL.IVREID.STEM_RELU``), last
stride 1 (``MODEL.LAST_STRIDE``), A = 512 (``MODEL.IVREID.AUX_DIM``).
"""
import itertools

import torch.nn.functional as F
from torch import nn

from model.backbones.single_stream import SingleStreamResNet
from model.base import ReIDModel
from model.heads import BNNeckHead, kaiming_linear_
from model.pretrained import find_imagenet_weights, read_imagenet_weights
from model.registry import MODELS
from utils.errors import ConfigError

AUX_HEADS = ("aux_visible", "aux_infrared")


class ModalityClassifier(nn.Module):
    """BatchNorm1d(D) -> Linear(D, A) -> Linear(A, C), no activation: [N, D] -> [N, C]."""

    def __init__(self, in_dim, hidden_dim, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_classes)
        kaiming_linear_(self.fc1)
        kaiming_linear_(self.fc2)

    def forward(self, x):
        return self.fc2(self.fc1(self.bn(x)))


def _lr_factor(value, key):
    if value < 0:
        raise ConfigError("%s must be >= 0, got %r" % (key, value))
    return float(value)


@MODELS.register("ivreid")
class IVReID(ReIDModel):
    train_outputs = ("pool", "feat", "logits", "aux_logits_visible", "aux_logits_infrared")
    embedding_sets = ("bn", "pool")
    embedding_presets = {"bn": {"bn": 1.0}, "pool": {"pool": 1.0}}
    default_embedding = "bn"

    def __init__(self, backbone, num_classes, aux_dim=512):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError("num_classes must be positive, got %r" % (num_classes,))
        if int(aux_dim) < 1:
            raise ConfigError("MODEL.IVREID.AUX_DIM must be a positive integer, got %r" % (aux_dim,))
        self.backbone = backbone
        self.feat_dim = backbone.out_channels
        self.head = BNNeckHead(self.feat_dim, num_classes, neck_init="default", neck_bias="trainable",
                               classifier="kaiming")
        self.aux_visible = ModalityClassifier(self.feat_dim, aux_dim, num_classes)
        self.aux_infrared = ModalityClassifier(self.feat_dim, aux_dim, num_classes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        m = cfg.MODEL
        backbone = SingleStreamResNet(m.BACKBONE, m.LAST_STRIDE, m.IVREID.CONV_BIAS, m.IVREID.STEM_RELU)
        if m.PRETRAINED:
            path = find_imagenet_weights(m.BACKBONE, m.PRETRAIN_PATH, download=m.DOWNLOAD)
            backbone.load_imagenet(read_imagenet_weights(path), source=path)
        return cls(backbone, num_classes, m.IVREID.AUX_DIM)

    def forward(self, images, modality=None, camids=None):
        pool, feat = self.head(self.backbone(images))
        if not self.training:
            return {"bn": F.normalize(feat, dim=1), "pool": F.normalize(pool, dim=1)}
        return {
            "pool": pool,
            "feat": feat,
            "logits": self.head.classify(feat),
            "aux_logits_visible": self.aux_visible(feat),
            "aux_logits_infrared": self.aux_infrared(feat),
        }

    def param_groups(self, cfg):
        """``main`` (backbone, BNNeck, classifier) at SOLVER.BACKBONE_LR_FACTOR, ``aux_heads`` at
        MODEL.IVREID.AUX_LR_FACTOR; every trainable tensor, BN and bias ones included."""
        main = itertools.chain(self.backbone.parameters(), self.head.parameters())
        aux = itertools.chain.from_iterable(getattr(self, name).parameters() for name in AUX_HEADS)
        return [
            {"name": "main", "params": [p for p in main if p.requires_grad],
             "lr_factor": _lr_factor(cfg.SOLVER.BACKBONE_LR_FACTOR, "SOLVER.BACKBONE_LR_FACTOR")},
            {"name": "aux_heads", "params": [p for p in aux if p.requires_grad],
             "lr_factor": _lr_factor(cfg.MODEL.IVREID.AUX_LR_FACTOR, "MODEL.IVREID.AUX_LR_FACTOR")},
        ]
