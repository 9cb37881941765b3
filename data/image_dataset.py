"""Test-time image dataset: paths -> normalised tensors at INPUT.SIZE_TEST.

``TestImageDataset(paths, cfg)[k]`` -> ``(img [3, H, W] float32, k)``: PIL open, RGB, LANCZOS
resize to (W, H), ToTensor, Normalize(PIXEL_MEAN, PIXEL_STD): the released test transform,
with no crop or padding.
Missing files are reported at construction (one error listing them); an image that cannot be
decoded raises a DatasetError naming its path.
"""
import os

from torch.utils.data import Dataset

from data.errors import DatasetError
from data.transforms import TestTransform


class TestImageDataset(Dataset):
    __test__ = False  # not a pytest test class

    def __init__(self, paths, cfg):
        self.paths = list(paths)
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            shown = "\n  ".join(missing[:10]) + ("\n  ... (%d in all)" % len(missing) if len(missing) > 10 else "")
            raise DatasetError("%d test image(s) not found:\n  %s" % (len(missing), shown))
        self.transform = TestTransform(cfg)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(self.paths[index]), index
