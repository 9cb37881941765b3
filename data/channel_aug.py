"""CAJ's channel augmentations as the unsupervised (TokenMatcher / CMAG) pipelines use them.

Each transform works **in place** on a normalised float tensor [C, H, W] (C = 3, or 1 for
the erasing) and returns it. Random draws come from a Python ``random``-like object passed
as ``rng`` (``random.Random`` or the ``random`` module itself, which is the default and
the released behaviour), with exactly the released calls in the released order, so a
seeded ``random.Random(s)`` gives the released output after ``random.seed(s)`` bit for bit:

* :class:`ChannelExchange` (gray=2): ``randint(0, gray)``; 0, 1, 2 copy that channel into
  all three, a larger value (reachable only with gray >= 3) writes the grey image. With
  the default gray=2 the output is always single-channel.
* :class:`ChannelAdapGray` (p=0.5): ``randint(0, 3)``; 0-2 copy that channel; 3 draws
  ``uniform(0, 1)`` and keeps the image if it is > p, else writes the grey image. Overall:
  one channel 3/4, grey 1/8, unchanged 1/8.
* :class:`ChannelAdap`: ``randint(0, 3)``; 0-2 copy that channel, 3 keeps the image (its
  probability argument is accepted and unused, as released).
* :class:`ChannelRandomErasing` (p=0.5, area sl..sh = 0.02..0.4, ratio r1 = 0.3, fill
  0.4914/0.4822/0.4465): ``uniform(0, 1)`` > p keeps the image; otherwise up to 100
  attempts of target = ``uniform(sl, sh)`` * H * W, aspect = ``uniform(r1, 1/r1)``,
  h = round(sqrt(target * aspect)), w = round(sqrt(target / aspect)); the first box with
  h < H and w < W is placed at ``randint(0, H - h)``, ``randint(0, W - w)`` and filled per
  channel with the fill values, in normalised units (not the pixel means).
* :class:`Gray`: grey = 0.2989 R + 0.5870 G + 0.1140 B (on the normalised channels) in all
  three channels; no draws.
"""
import math
import random

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
ERASE_FILL = (0.4914, 0.4822, 0.4465)


def _rng(rng):
    return random if rng is None else rng


def _copy_channel(img, idx):
    for c in range(3):
        if c != idx:
            img[c] = img[idx]
    return img


def _gray(img):
    grey = GRAY_WEIGHTS[0] * img[0] + GRAY_WEIGHTS[1] * img[1] + GRAY_WEIGHTS[2] * img[2]
    img[0], img[1], img[2] = grey, grey, grey
    return img


class ChannelExchange:
    """Copy a random channel into all three (or grey for draws above 2; see the module doc)."""

    def __init__(self, gray=2):
        self.gray = int(gray)

    def __call__(self, img, rng=None):
        idx = _rng(rng).randint(0, self.gray)
        return _copy_channel(img, idx) if idx < 3 else _gray(img)

    def __repr__(self):
        return "ChannelExchange(gray=%d)" % self.gray


class ChannelAdapGray:
    """One random channel (3/4), grey (p/4) or unchanged ((1-p)/4); see the module doc."""

    def __init__(self, probability=0.5):
        self.probability = float(probability)

    def __call__(self, img, rng=None):
        rng = _rng(rng)
        idx = rng.randint(0, 3)
        if idx < 3:
            return _copy_channel(img, idx)
        if rng.uniform(0, 1) > self.probability:
            return img
        return _gray(img)

    def __repr__(self):
        return "ChannelAdapGray(probability=%g)" % self.probability


class ChannelAdap:
    """One random channel (3/4) or unchanged (1/4); `probability` is unused, as released."""

    def __init__(self, probability=0.5):
        self.probability = float(probability)

    def __call__(self, img, rng=None):
        idx = _rng(rng).randint(0, 3)
        return _copy_channel(img, idx) if idx < 3 else img

    def __repr__(self):
        return "ChannelAdap(probability=%g)" % self.probability


class ChannelRandomErasing:
    """Random erasing with per-channel fill values in normalised units; see the module doc."""

    def __init__(self, probability=0.5, sl=0.02, sh=0.4, r1=0.3, mean=ERASE_FILL):
        self.probability = float(probability)
        self.sl, self.sh, self.r1 = float(sl), float(sh), float(r1)
        self.mean = tuple(float(m) for m in mean)

    def __call__(self, img, rng=None):
        rng = _rng(rng)
        if rng.uniform(0, 1) > self.probability:
            return img
        channels, height, width = img.shape
        for _ in range(100):
            target = rng.uniform(self.sl, self.sh) * height * width
            aspect = rng.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                # A single-channel image takes the first fill value only, as released.
                for c in range(3 if channels == 3 else 1):
                    img[c, top:top + h, left:left + w] = self.mean[c]
                return img
        return img

    def __repr__(self):
        return "ChannelRandomErasing(probability=%g)" % self.probability


class Gray:
    """The grey image (weights 0.2989, 0.5870, 0.1140) in all three channels."""

    def __call__(self, img, rng=None):
        return _gray(img)

    def __repr__(self):
        return "Gray()"
