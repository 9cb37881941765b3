"""Training-label checks shared by every dataset.

The identity sampler indexes identities by label value (as the released IdentitySampler
does) and the classifier has one output per label, so the labels of a training set must be
the contiguous range 0..C-1, and every identity must have images in both modalities.
Anything else is one DatasetError naming the sources.
"""
import numpy as np

from data.errors import DatasetError


def _show(values, limit=10):
    values = sorted(int(v) for v in values)
    text = ", ".join(str(v) for v in values[:limit])
    return text + (" ... (%d in all)" % len(values) if len(values) > limit else "")


def validate_train_labels(rgb_labels, ir_labels, rgb_source, ir_source):
    """Return (rgb, ir) labels as int64 arrays after checking contiguity and both modalities."""
    rgb = np.asarray(rgb_labels).reshape(-1)
    ir = np.asarray(ir_labels).reshape(-1)
    for arr, src in ((rgb, rgb_source), (ir, ir_source)):
        if arr.size == 0:
            raise DatasetError("%s: no training images" % src)
        if not np.issubdtype(arr.dtype, np.integer):
            raise DatasetError("%s: labels must be integers, got dtype %s" % (src, arr.dtype))
    rgb, ir = rgb.astype(np.int64), ir.astype(np.int64)
    ids_rgb, ids_ir = set(np.unique(rgb).tolist()), set(np.unique(ir).tolist())
    if ids_rgb != ids_ir:
        only_rgb, only_ir = ids_rgb - ids_ir, ids_ir - ids_rgb
        parts = []
        if only_rgb:
            parts.append("labels only in %s: %s" % (rgb_source, _show(only_rgb)))
        if only_ir:
            parts.append("labels only in %s: %s" % (ir_source, _show(only_ir)))
        raise DatasetError("every training identity needs visible and infrared images; " + "; ".join(parts))
    num = len(ids_rgb)
    if min(ids_rgb) != 0 or max(ids_rgb) != num - 1:
        missing = set(range(max(ids_rgb) + 1)) - ids_rgb
        raise DatasetError("training labels in %s / %s must be contiguous 0..C-1; found %d labels in [%d, %d]%s"
                           % (rgb_source, ir_source, num, min(ids_rgb), max(ids_rgb),
                              ", missing: " + _show(missing) if missing else ""))
    return rgb, ir
