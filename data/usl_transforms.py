"""Image transforms of the unsupervised TokenMatcher / CMAG recipe: training views, the
clustering-time transform and the evaluation preprocessing.

Every transform maps one image (a path, a PIL image or a uint8 array [h, w, 3] at any
size) to a float32 tensor [3, H, W] normalised with the ImageNet mean and std.

**Training views.** Steps (applied in the listed order):

* ``jitter``: ColorJitter(brightness, contrast, saturation, hue) on the PIL image, the four
  adjustments in a random order with factors drawn per call (torchvision semantics);
* ``resize``: Resize((H, W)) with the recipe's filter (bicubic SYSU, bilinear RegDB);
* ``pad`` + ``crop``: zero Pad(padding) then RandomCrop((H, W));
* ``flip``: RandomHorizontalFlip(flip_prob);
* ``tensor``: ToTensor + Normalize;
* ``erase``: :class:`data.channel_aug.ChannelRandomErasing` (fill in normalised units);
* ``exchange``: :class:`data.channel_aug.ChannelExchange` (gray=2: always one channel);
* ``adap_gray``: :class:`data.channel_aug.ChannelAdapGray`.

Two layouts (:data:`LAYOUTS`) exist; which stage of which recipe uses which, and every other
value, is the one table :data:`REFERENCE_RECIPES`:

==============  =====================================  ===========================================
layout          ``jitter_view2`` (SYSU stage 1)        ``jitter_first`` (SYSU camera-local runs
                                                       and stage 2, RegDB both stages)
==============  =====================================  ===========================================
RGB view 1      resize pad crop flip tensor erase      jitter resize pad crop flip tensor erase
RGB view 2      resize pad crop flip jitter tensor     jitter resize pad crop flip tensor erase
                erase exchange                         exchange
IR              resize pad crop flip tensor erase      jitter resize pad crop flip tensor erase
                adap_gray                              adap_gray
==============  =====================================  ===========================================

**Randomness.** A call takes an :class:`AugRng`: a ``torch.Generator`` for the draws
torchvision makes (crop offsets with ``torch.randint(0, n, (1,))``, the flip with
``torch.rand(1)``, the jitter order with ``torch.randperm(4)`` and its factors with
``torch.empty(1).uniform_``), and a Python ``random.Random`` for the channel
augmentations. The calls, their order and their arguments are exactly the released ones, so

* reference mode, ``AugRng.global_state()`` (torch's default generator and the ``random``
  module), is the released behaviour, and ``AugRng.from_seed(s)`` reproduces the released
  output after ``random.seed(s); torch.manual_seed(s)`` bit for bit (same torch, Pillow);
* in training the pseudo-labelled sets build ``AugRng.from_seed(item seed)`` per sampled
  item from the seed the sampler attached to it (an RGB item's two views are drawn one
  after the other from the same pair of streams, view 1 first, as released), so an item is
  augmented identically in any DataLoader worker, with any number of workers and after a
  resume.

**Clustering-time transform** (feature extraction for the pseudo labels): Resize((H, W),
bicubic), ToTensor, Normalize; no randomness.

**Evaluation preprocessing:** PIL resize to (W, H) with LANCZOS to uint8, then ToPILImage,
Resize((H, W)) (a no-op at that size), ToTensor, Normalize.
"""
import random
from collections import namedtuple

import numpy as np
import torch
from PIL import Image

from data.channel_aug import ChannelAdapGray, ChannelExchange, ChannelRandomErasing
from data.image_io import open_image
from utils.compat import torchvision  # noqa: F401  (registers the package for the import below)
import torchvision.transforms.functional as TF  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from utils.errors import ConfigError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILTERS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
VIEWS = ("rgb", "rgb2", "ir")

LAYOUTS = {
    "jitter_view2": {
        "rgb": ("resize", "pad", "crop", "flip", "tensor", "erase"),
        "rgb2": ("resize", "pad", "crop", "flip", "jitter", "tensor", "erase", "exchange"),
        "ir": ("resize", "pad", "crop", "flip", "tensor", "erase", "adap_gray"),
    },
    "jitter_first": {
        "rgb": ("jitter", "resize", "pad", "crop", "flip", "tensor", "erase"),
        "rgb2": ("jitter", "resize", "pad", "crop", "flip", "tensor", "erase", "exchange"),
        "ir": ("jitter", "resize", "pad", "crop", "flip", "tensor", "erase", "adap_gray"),
    },
}
"""Training steps of each view (``rgb`` = RGB view 1, ``rgb2`` = RGB view 2, ``ir``) per layout."""

AugParams = namedtuple("AugParams", "layout resize size padding flip_prob jitter erase_prob adap_gray_prob "
                                    "exchange_gray mean std")
"""Values of one stage's training views: layout (a :data:`LAYOUTS` key), resize filter,
size (H, W), zero padding, flip probability, jitter (brightness, contrast, saturation, hue),
ChannelRandomErasing / ChannelAdapGray probabilities, ChannelExchange's gray bound, mean, std."""

_JITTER = (0.5, 0.5, 0.5, 0.5)
# The released scripts' values. Only the layout and the resize filter differ between them;
# "camera" is SYSU's camera-local runs (RGB runs use view 1 only).
#                    layout           resize      size        pad  flip  jitter   erase adap  gray
REFERENCE_RECIPES = {
    ("sysu", "stage1"): AugParams("jitter_view2", "bicubic", (384, 128), 10, 0.5, _JITTER, 0.5, 0.5, 2,
                                  IMAGENET_MEAN, IMAGENET_STD),
    ("sysu", "camera"): AugParams("jitter_first", "bicubic", (384, 128), 10, 0.5, _JITTER, 0.5, 0.5, 2,
                                  IMAGENET_MEAN, IMAGENET_STD),
    ("sysu", "stage2"): AugParams("jitter_first", "bicubic", (384, 128), 10, 0.5, _JITTER, 0.5, 0.5, 2,
                                  IMAGENET_MEAN, IMAGENET_STD),
    ("regdb", "stage1"): AugParams("jitter_first", "bilinear", (384, 128), 10, 0.5, _JITTER, 0.5, 0.5, 2,
                                   IMAGENET_MEAN, IMAGENET_STD),
    ("regdb", "stage2"): AugParams("jitter_first", "bilinear", (384, 128), 10, 0.5, _JITTER, 0.5, 0.5, 2,
                                   IMAGENET_MEAN, IMAGENET_STD),
}
STAGES = ("stage1", "camera", "stage2")


class AugRng:
    """The two random sources of an augmentation: ``torch`` (a ``torch.Generator``, or None
    for torch's default generator) and ``py`` (a ``random.Random``, or the ``random``
    module)."""

    def __init__(self, torch_generator=None, py=random):
        self.torch = torch_generator
        self.py = py

    @classmethod
    def from_seed(cls, seed):
        """Private streams: ``torch.Generator().manual_seed(seed)`` and ``random.Random(seed)``."""
        return cls(torch.Generator().manual_seed(int(seed)), random.Random(int(seed)))

    @classmethod
    def global_state(cls):
        """torch's default generator and the ``random`` module: the released draws."""
        return cls(None, random)


def as_pil(image):
    """A path, PIL image or uint8 array [h, w, 3] as an RGB PIL image."""
    if isinstance(image, str):
        return open_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def _jitter_bounds(jitter):
    """torchvision's ColorJitter ranges: (1-v, 1+v) clipped at 0 for the first three, (-h, h)
    for hue; a zero value is None (no draw, no adjustment)."""
    b, c, s, h = (float(v) for v in jitter)
    bounds = [(max(0.0, 1 - v), 1 + v) if v else None for v in (b, c, s)]
    return bounds + [(-h, h) if h else None]


class USLTrainTransform:
    """One training view: ``steps`` (a :data:`LAYOUTS` entry) with the values of
    :class:`AugParams`; ``transform(image, rng)`` -> float32 [3, H, W] (module doc)."""

    def __init__(self, steps, params):
        unknown = [s for s in steps if s not in _STEPS]
        if unknown:
            raise ValueError("unknown training steps %s (known: %s)" % (unknown, ", ".join(_STEPS)))
        if params.resize not in FILTERS:
            raise ConfigError("USL.INPUT.RESIZE_FILTER must be one of %s, got %r" % (", ".join(FILTERS), params.resize))
        self.steps = tuple(steps)
        self.size = (int(params.size[0]), int(params.size[1]))
        self.filter = FILTERS[params.resize]
        self.padding = int(params.padding)
        self.flip_prob = float(params.flip_prob)
        self.jitter = _jitter_bounds(params.jitter)
        self.mean, self.std = [float(m) for m in params.mean], [float(s) for s in params.std]
        self.erasing = ChannelRandomErasing(params.erase_prob)
        self.exchange = ChannelExchange(params.exchange_gray)
        self.adap_gray = ChannelAdapGray(params.adap_gray_prob)

    def __repr__(self):
        return "USLTrainTransform(%s)" % " ".join(self.steps)

    def _jitter(self, img, rng):
        order = torch.randperm(4, generator=rng.torch).tolist()
        factors = [None if b is None else float(torch.empty(1).uniform_(b[0], b[1], generator=rng.torch))
                   for b in self.jitter]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in order:
            if factors[k] is not None:
                img = ops[k](img, factors[k])
        return img

    def _resize(self, img, rng):
        return TF.resize(img, list(self.size), interpolation=self.filter)

    def _pad(self, img, rng):
        return TF.pad(img, self.padding)

    def _crop(self, img, rng):
        height, width = self.size
        w, h = img.size
        if h < height or w < width:
            raise ValueError("image %dx%d is smaller than the crop %dx%d" % (w, h, width, height))
        if (h, w) == (height, width):
            return img
        top = int(torch.randint(0, h - height + 1, size=(1,), generator=rng.torch).item())
        left = int(torch.randint(0, w - width + 1, size=(1,), generator=rng.torch).item())
        return TF.crop(img, top, left, height, width)

    def _flip(self, img, rng):
        return TF.hflip(img) if bool(torch.rand(1, generator=rng.torch) < self.flip_prob) else img

    def _tensor(self, img, rng):
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def _erase(self, x, rng):
        return self.erasing(x, rng.py)

    def _exchange(self, x, rng):
        return self.exchange(x, rng.py)

    def _adap_gray(self, x, rng):
        return self.adap_gray(x, rng.py)

    def __call__(self, image, rng=None):
        rng = AugRng.global_state() if rng is None else rng
        x = as_pil(image)
        for step in self.steps:
            x = _STEPS[step](self, x, rng)
        return x.contiguous()


_STEPS = {"jitter": USLTrainTransform._jitter, "resize": USLTrainTransform._resize, "pad": USLTrainTransform._pad,
          "crop": USLTrainTransform._crop, "flip": USLTrainTransform._flip, "tensor": USLTrainTransform._tensor,
          "erase": USLTrainTransform._erase, "exchange": USLTrainTransform._exchange,
          "adap_gray": USLTrainTransform._adap_gray}


def build_train_views(params, views=VIEWS):
    """``{view: USLTrainTransform}`` of one stage for `views` (a subset of :data:`VIEWS`)."""
    if params.layout not in LAYOUTS:
        raise ConfigError("unknown augmentation layout %r (known: %s)" % (params.layout, ", ".join(LAYOUTS)))
    return {v: USLTrainTransform(LAYOUTS[params.layout][v], params) for v in views}


def reference_params(recipe, stage):
    """The released :class:`AugParams` of `recipe` (sysu, regdb) at `stage` (:data:`STAGES`)."""
    try:
        return REFERENCE_RECIPES[(recipe, stage)]
    except KeyError:
        raise ConfigError("no augmentation recipe for %s %s (known: %s)"
                          % (recipe, stage, ", ".join("%s %s" % k for k in REFERENCE_RECIPES))) from None


def params_from_config(cfg, stage):
    """:class:`AugParams` of `stage` (:data:`STAGES`) from the ``USL.INPUT`` keys."""
    if stage not in STAGES:
        raise ValueError("stage must be one of %s, got %r" % (", ".join(STAGES), stage))
    inp = cfg.USL.INPUT
    layout = {"stage1": inp.LAYOUT_STAGE1, "camera": inp.LAYOUT_CAMERA, "stage2": inp.LAYOUT_STAGE2}[stage]
    if layout not in LAYOUTS:
        raise ConfigError("USL.INPUT.LAYOUT_%s must be one of %s, got %r"
                          % (stage.upper(), ", ".join(LAYOUTS), layout))
    if len(inp.COLOR_JITTER) != 4:
        raise ConfigError("USL.INPUT.COLOR_JITTER must be [brightness, contrast, saturation, hue], got %s"
                          % list(inp.COLOR_JITTER))
    return AugParams(layout, inp.RESIZE_FILTER, tuple(int(v) for v in inp.SIZE), int(inp.PADDING),
                     float(inp.FLIP_PROB), tuple(float(v) for v in inp.COLOR_JITTER), float(inp.ERASE_PROB),
                     float(inp.ADAP_GRAY_PROB), int(inp.EXCHANGE_GRAY), tuple(cfg.INPUT.PIXEL_MEAN),
                     tuple(cfg.INPUT.PIXEL_STD))


class ClusterTransform:
    """Clustering-time extraction: Resize((H, W), bicubic), ToTensor, Normalize."""

    def __init__(self, size=(384, 128), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (int(size[0]), int(size[1]))
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image):
        img = TF.resize(as_pil(image), list(self.size), interpolation=InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std).contiguous()


class EvalTransform:
    """Evaluation: PIL LANCZOS resize to (W, H) as uint8, then ToPILImage, Resize((H, W)),
    ToTensor, Normalize (the released test scripts' two-step preprocessing)."""

    def __init__(self, size=(384, 128), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (int(size[0]), int(size[1]))
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def resized(self, image):
        """The uint8 array [H, W, 3] of the first step."""
        return np.array(as_pil(image).resize((self.size[1], self.size[0]), Image.LANCZOS), dtype=np.uint8)

    def __call__(self, image):
        img = TF.resize(TF.to_pil_image(self.resized(image)), list(self.size))
        return TF.normalize(TF.to_tensor(img), self.mean, self.std).contiguous()
