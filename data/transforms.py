"""Training and test image transforms: the released CMFN pipeline and CAJ's channel augmentations.

Training, per image (uint8 [H, W, 3] array at the training size in, float32 [3, H, W] out):

1. ColorJitter(brightness, contrast, saturation, hue) = INPUT.COLOR_JITTER, in random order,
   on a PIL image as released (Pillow's hue shift is also ~8x faster than the tensor one);
   skipped when the list is empty.
2. Pad(INPUT.PADDING) with zeros + RandomCrop(SIZE_TRAIN), done as one crop of the virtually
   padded image; RandomGrayscale(GRAYSCALE_PROB) in between (released order; grey stays 0 in
   the padding, so doing it on the crop is the same), with Pillow's integer L formula.
3. RandomHorizontalFlip(FLIP_PROB), ToTensor, Normalize(PIXEL_MEAN, PIXEL_STD).
4. RandomErasing(ERASE_PROB, area ERASE_AREA, aspect ratio [ERASE_RATIO, 1/ERASE_RATIO]);
   the fill ERASE_FILL is written into the *normalised* tensor (released semantics).
5. CAJ extras (0 = off, the released default): ChannelRandomErasing(CHANNEL_ERASE) on both
   modalities (area 0.02-0.4, ratio 0.3, fill 0.4914/0.4822/0.4465), then ChannelExchange
   (gray=2, applied with probability CHANNEL_EXCHANGE) on visible images or
   ChannelAdapGray(CHANNEL_ADAP_GRAY) on infrared images.

Every random draw comes from the ``torch.Generator`` passed to the call (the training set
gives each sampled pair its own generator seeded from (seed, epoch, position), so batches do
not depend on the number of workers or on earlier epochs); with ``None`` torch's global RNG
is used.

   With INPUT.ERASE_STYLE ``torchvision`` the box follows torchvision's
   ``RandomErasing(value="random")`` instead (FusionReID): log-uniform aspect ratio, at most 10
   attempts, filled with per-pixel N(0, 1) noise.

Test: PIL resize to SIZE_TEST (W, H) with INPUT.TEST_RESIZE_FILTER or else INPUT.RESIZE_FILTER
(LANCZOS for CMFN, bilinear for IV-REID and FusionReID), ToTensor, Normalize (no crop, no
padding).
"""
import math

import numpy as np
import torch
from PIL import Image

from data.image_io import open_image, resize_image
from utils.compat import torchvision  # noqa: F401  (registers the package for the import below)
import torchvision.transforms.functional as TF  # noqa: E402

CAJ_ERASE_FILL = (0.4914, 0.4822, 0.4465)
CAJ_ERASE_AREA = (0.02, 0.4)
CAJ_ERASE_RATIO = 0.3
_GRAY = (0.2989, 0.5870, 0.1140)  # CAJ's grey weights on the normalised tensor


def _rand(g):
    return float(torch.rand((), generator=g))


def _uniform(g, lo, hi):
    return lo + (hi - lo) * _rand(g)


def _randint(g, lo, hi):
    """Uniform integer in [lo, hi] (inclusive, like random.randint)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _jitter_range(value, center=1.0, lower=0.0):
    return max(lower, center - value), center + value


def color_jitter(img, jitter, g):
    """Pillow ColorJitter (torchvision semantics: random order, factors drawn per call)."""
    b, c, s, h = (list(jitter) + [0.0] * 4)[:4]
    order = torch.randperm(4, generator=g).tolist()
    factors = [
        _uniform(g, *_jitter_range(b)) if b else None,
        _uniform(g, *_jitter_range(c)) if c else None,
        _uniform(g, *_jitter_range(s)) if s else None,
        _uniform(g, -h, h) if h else None,
    ]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in order:
        if factors[k] is not None:
            img = ops[k](img, factors[k])
    return img


def random_erase(x, g, prob, area, ratio, fill):
    """Random erasing (Zhong et al., as in DEEN/CAJ) in place on a [C, H, W] float tensor."""
    if prob <= 0 or _rand(g) >= prob:
        return x
    _, height, width = x.shape
    for _ in range(100):
        target = _uniform(g, area[0], area[1]) * height * width
        aspect = _uniform(g, ratio, 1.0 / ratio)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            top = _randint(g, 0, height - h)
            left = _randint(g, 0, width - w)
            for c in range(x.shape[0]):
                x[c, top:top + h, left:left + w] = fill[c % len(fill)]
            return x
    return x


def random_erase_torchvision(x, g, prob, area, ratio):
    """torchvision's RandomErasing(p, scale=area, ratio=(ratio, 1/ratio), value="random") in
    place on a [C, H, W] float tensor, drawing from `g`."""
    if prob <= 0 or _rand(g) >= prob:
        return x
    channels, height, width = x.shape
    log_ratio = torch.log(torch.tensor((ratio, 1.0 / ratio)))
    for _ in range(10):
        # the draws, their float32 arithmetic and their order are torchvision's
        target = height * width * torch.empty(1).uniform_(area[0], area[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            noise = torch.empty((channels, h, w), dtype=torch.float32).normal_(generator=g)
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g))
            x[:, top:top + h, left:left + w] = noise.to(x.dtype)
            return x
    return x


def channel_exchange(x, g):
    """CAJ ChannelExchange(gray=2): replicate one random channel (0, 1 or 2) into all three."""
    idx = _randint(g, 0, 2)
    return x[idx:idx + 1].expand_as(x).clone()


def channel_adap_gray(x, g, prob):
    """CAJ ChannelAdapGray(prob): idx in 0..3; 0-2 replicate that channel; 3 = grey w.p. prob."""
    idx = _randint(g, 0, 3)
    if idx < 3:
        return x[idx:idx + 1].expand_as(x).clone()
    if _rand(g) < prob:
        grey = _GRAY[0] * x[0] + _GRAY[1] * x[1] + _GRAY[2] * x[2]
        return grey.unsqueeze(0).expand_as(x).clone()
    return x


class TrainTransform:
    """The training pipeline of one modality ("visible" or "infrared"); see the module doc."""

    def __init__(self, cfg, modality):
        if modality not in ("visible", "infrared"):
            raise ValueError("modality must be 'visible' or 'infrared', got %r" % modality)
        inp = cfg.INPUT
        self.modality = modality
        self.height, self.width = int(inp.SIZE_TRAIN[0]), int(inp.SIZE_TRAIN[1])
        self.padding = int(inp.PADDING)
        self.jitter = tuple(float(v) for v in inp.COLOR_JITTER)
        self.gray_prob = float(inp.GRAYSCALE_PROB)
        self.flip_prob = float(inp.FLIP_PROB)
        self.mean = torch.tensor(inp.PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(inp.PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
        self.erase = (float(inp.ERASE_PROB), tuple(inp.ERASE_AREA), float(inp.ERASE_RATIO), tuple(inp.ERASE_FILL))
        self.erase_style = inp.ERASE_STYLE
        self.channel_erase = float(inp.CHANNEL_ERASE)
        self.channel_exchange = float(inp.CHANNEL_EXCHANGE) if modality == "visible" else 0.0
        self.channel_adap_gray = float(inp.CHANNEL_ADAP_GRAY) if modality == "infrared" else 0.0

    def _pad_crop(self, img, g):
        """Crop SIZE_TRAIN out of `img` [3, h, w] zero-padded by PADDING on every side."""
        _, h, w = img.shape
        ph, pw = h + 2 * self.padding, w + 2 * self.padding
        if ph < self.height or pw < self.width:
            raise ValueError("image %dx%d (+%d padding) is smaller than the crop %dx%d"
                             % (w, h, self.padding, self.width, self.height))
        top = _randint(g, 0, ph - self.height) - self.padding
        left = _randint(g, 0, pw - self.width) - self.padding
        if top == 0 and left == 0 and h == self.height and w == self.width:
            return img
        out = torch.zeros((3, self.height, self.width), dtype=img.dtype)
        y0, y1 = max(top, 0), min(top + self.height, h)
        x0, x1 = max(left, 0), min(left + self.width, w)
        if y1 > y0 and x1 > x0:
            out[:, y0 - top:y1 - top, x0 - left:x1 - left] = img[:, y0:y1, x0:x1]
        return out

    def __call__(self, array, generator=None):
        g = generator
        if self.jitter and any(self.jitter):
            array = np.asarray(color_jitter(Image.fromarray(np.asarray(array)), self.jitter, g))
        img = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        gray = _rand(g) < self.gray_prob
        img = self._pad_crop(img, g)
        if gray:
            # Pillow's "L" conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
            v = img.to(torch.int32)
            lum = ((v[0] * 19595 + v[1] * 38470 + v[2] * 7471 + 32768) >> 16).to(torch.uint8)
            img = lum.unsqueeze(0).expand(3, -1, -1)
        if _rand(g) < self.flip_prob:
            img = img.flip(-1)
        x = img.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        if self.erase_style == "torchvision":
            random_erase_torchvision(x, g, *self.erase[:3])
        else:
            random_erase(x, g, *self.erase)
        if self.channel_erase > 0:
            random_erase(x, g, self.channel_erase, CAJ_ERASE_AREA, CAJ_ERASE_RATIO, CAJ_ERASE_FILL)
        if self.channel_exchange > 0 and _rand(g) < self.channel_exchange:
            x = channel_exchange(x, g)
        if self.channel_adap_gray > 0:
            x = channel_adap_gray(x, g, self.channel_adap_gray)
        return x.contiguous()


def build_train_transforms(cfg):
    """(visible transform, infrared transform): the same pipeline, per-modality CAJ extras."""
    return TrainTransform(cfg, "visible"), TrainTransform(cfg, "infrared")


class TestTransform:
    """Path -> float32 [3, H, W]: PIL resize to SIZE_TEST (INPUT.TEST_RESIZE_FILTER, by default
    INPUT.RESIZE_FILTER), ToTensor, Normalize."""

    __test__ = False  # not a pytest test class

    def __init__(self, cfg):
        self.resample = cfg.INPUT.TEST_RESIZE_FILTER or cfg.INPUT.RESIZE_FILTER
        self.height, self.width = int(cfg.INPUT.SIZE_TEST[0]), int(cfg.INPUT.SIZE_TEST[1])
        self.mean = torch.tensor(cfg.INPUT.PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.INPUT.PIXEL_STD, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, path):
        img = resize_image(open_image(path), (self.width, self.height), self.resample)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std).contiguous()
