"""Identity loss: cross-entropy over the classifier logits.

``identity_loss(logits [N, C], labels [N], label_smooth=0) -> scalar``. The released recipe
uses plain cross-entropy (``label_smooth = 0``, config ``LOSS.LABEL_SMOOTH``); with
smoothing eps the target is ``(1 - eps) * onehot + eps / C``. Computed in float32.
"""
import torch.nn.functional as F

from loss.distances import full_precision


def identity_loss(logits, labels, label_smooth=0.0):
    return F.cross_entropy(full_precision(logits), labels, label_smoothing=label_smooth)
