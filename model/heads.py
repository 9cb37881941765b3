"""Re-identification head: global average pooling, BNNeck, classifier.

``forward(x [N, D, h, w]) -> (pool [N, D], bn [N, D])``: ``pool`` is the average-pooled
feature (used by the metric losses), ``bn`` the BNNeck output (fed to the classifier and, L2-
normalised, used for retrieval). ``classify(bn) -> logits [N, num_classes]``.

Initialisation, by option (the defaults are the released CMFN's head):

* ``neck_init``: ``"normal"`` BNNeck weight ~ N(1, 0.01); ``"default"`` PyTorch's (weight 1).
  The bias starts at 0 either way.
* ``neck_bias``: ``"frozen"`` (requires_grad False, so it stays 0 and the BN only scales) or
  ``"trainable"``.
* ``classifier``: ``"normal"`` bias-free, weight ~ N(0, 0.001); ``"kaiming"`` with a bias,
  weight kaiming-normal over fan_out (std sqrt(2 / num_classes)), bias 0.
"""
import torch.nn.functional as F
from torch import nn

NECK_INITS = ("normal", "default")
NECK_BIASES = ("frozen", "trainable")
CLASSIFIERS = ("normal", "kaiming")


def kaiming_linear_(linear):
    """Weight ~ kaiming-normal over fan_out (a=0: std sqrt(2 / out_features)), bias 0."""
    nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _check(option, value, choices):
    if value not in choices:
        raise ValueError("BNNeckHead %s must be one of %s, got %r" % (option, ", ".join(choices), value))


class BNNeckHead(nn.Module):
    def __init__(self, feat_dim, num_classes, neck_init="normal", neck_bias="frozen", classifier="normal"):
        super().__init__()
        _check("neck_init", neck_init, NECK_INITS)
        _check("neck_bias", neck_bias, NECK_BIASES)
        _check("classifier", classifier, CLASSIFIERS)
        self.bnneck = nn.BatchNorm1d(feat_dim)
        self.bnneck.bias.requires_grad_(neck_bias == "trainable")
        self.classifier = nn.Linear(feat_dim, num_classes, bias=classifier == "kaiming")
        # The draws stay in this order so that a CMFN head from a given seed is unchanged.
        if neck_init == "normal":
            nn.init.normal_(self.bnneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bnneck.bias)
        if classifier == "normal":
            nn.init.normal_(self.classifier.weight, 0.0, 0.001)
        else:
            kaiming_linear_(self.classifier)

    def forward(self, x):
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, self.bnneck(pool)

    def classify(self, bn):
        return self.classifier(bn)
