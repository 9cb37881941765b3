"""Training sets defined by two "<path> <label>" lists (RegDB, LLCM).

The lists are read and their labels checked first (contiguous, every id in both modalities),
then every image is decoded once, resized to the training (W, H) with INPUT.RESIZE_FILTER, into
an in-memory uint8 array [N, H, W, 3] (parallel, ``data/image_io.py``).
"""
import os

import numpy as np

from data.image_io import decode_resized
from data.labels import validate_train_labels
from data.listfiles import read_label_list

# Show a progress bar only when decoding takes noticeable time.
_PROGRESS_MIN_IMAGES = 2000


def read_training_lists(root, rgb_list, ir_list):
    """((rgb paths, rgb labels), (ir paths, ir labels)) with checked labels; absolute paths."""
    rgb_rel, rgb_lab = read_label_list(rgb_list, root)
    ir_rel, ir_lab = read_label_list(ir_list, root)
    rgb_lab, ir_lab = validate_train_labels(rgb_lab, ir_lab, rgb_list, ir_list)
    return ([os.path.join(root, r) for r in rgb_rel], rgb_lab), ([os.path.join(root, r) for r in ir_rel], ir_lab)


def load_listed_training(root, rgb_list, ir_list, size, name, resample="lanczos"):
    """(rgb [N, H, W, 3] uint8, rgb labels, ir array, ir labels) at `size` = (W, H)."""
    (rgb_paths, rgb_lab), (ir_paths, ir_lab) = read_training_lists(root, rgb_list, ir_list)
    arrays = []
    for mod, paths in (("visible", rgb_paths), ("infrared", ir_paths)):
        desc = "%s %s %dx%d" % (name, mod, size[0], size[1]) if len(paths) >= _PROGRESS_MIN_IMAGES else None
        arrays.append(decode_resized(paths, size, progress=desc, resample=resample))
    return arrays[0], np.asarray(rgb_lab), arrays[1], np.asarray(ir_lab)
