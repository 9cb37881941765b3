"""Re-identification head: global average pooling, BNNeck, bias-free classifier (spec 2.1 steps 13-15).

``forward(x [N, D, h, w]) -> (pool [N, D], bn [N, D])``: ``pool`` is the average-pooled
feature (used by the metric losses), ``bn`` the BNNeck output (fed to the classifier and, L2-
normalised, used for retrieval). ``classify(bn) -> logits [N, num_classes]``.

Initialisation as released: BNNeck weight ~ N(1, 0.01), bias 0 and frozen (requires_grad
False, so it stays 0 and the BN only scales); classifier weight ~ N(0, 0.001), no bias.
The optimizer gives everything under ``head.`` the full learning rate.
"""
import torch.nn.functional as F
from torch import nn


class BNNeckHead(nn.Module):
    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.bnneck = nn.BatchNorm1d(feat_dim)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        nn.init.normal_(self.bnneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bnneck.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def forward(self, x):
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, self.bnneck(pool)

    def classify(self, bn):
        return self.classifier(bn)
