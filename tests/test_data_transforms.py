"""Training transforms: shapes, pad/crop, grayscale, flip, erasing fill semantics, CAJ extras."""
import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import TrainTransform, channel_adap_gray, channel_exchange, random_erase
from utils.config import build_config

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _cfg(*opts):
    return build_config("demo", opts=["INPUT.SIZE_TRAIN", "[32, 16]", *opts])


def _image(h=32, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalised(arr):
    return torch.from_numpy(((arr / 255.0 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


def test_identity_settings_give_to_tensor_normalize():
    cfg = _cfg("INPUT.COLOR_JITTER", "[]", "INPUT.PADDING", "0", "INPUT.GRAYSCALE_PROB", "0.0",
               "INPUT.FLIP_PROB", "0.0", "INPUT.ERASE_PROB", "0.0")
    img = _image()
    out = TrainTransform(cfg, "visible")(img, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised(img), atol=1e-6, rtol=0)


def test_pad_crop_is_a_shifted_window_with_zero_padding():
    cfg = _cfg("INPUT.COLOR_JITTER", "[]", "INPUT.PADDING", "4", "INPUT.GRAYSCALE_PROB", "0.0",
               "INPUT.FLIP_PROB", "0.0", "INPUT.ERASE_PROB", "0.0")
    img = _image()
    padded = np.zeros((40, 24, 3), dtype=np.uint8)
    padded[4:36, 4:20] = img
    windows = {(y, x): _normalised(padded[y:y + 32, x:x + 16]) for y in range(9) for x in range(9)}
    seen = set()
    t = TrainTransform(cfg, "infrared")
    for s in range(60):
        out = t(img, torch.Generator().manual_seed(s))
        match = [k for k, w in windows.items() if torch.allclose(out, w, atol=1e-6)]
        assert match, "output is not a window of the zero-padded image"
        seen.add(match[0])
    assert len(seen) > 20  # offsets vary over the 9 x 9 range


def test_grayscale_flip_and_probabilities():
    img = _image()
    gray_cfg = _cfg("INPUT.COLOR_JITTER", "[]", "INPUT.PADDING", "0", "INPUT.GRAYSCALE_PROB", "1.0",
                    "INPUT.FLIP_PROB", "1.0", "INPUT.ERASE_PROB", "0.0")
    out = TrainTransform(gray_cfg, "visible")(img, torch.Generator().manual_seed(0))
    lum = np.asarray(Image.fromarray(img).convert("L"))[:, ::-1]  # Pillow's L, then flipped
    expected = np.repeat(lum[..., None], 3, axis=2)
    torch.testing.assert_close(out, _normalised(expected), atol=1e-6, rtol=0)


def test_color_jitter_changes_colours_and_is_seeded():
    cfg = _cfg("INPUT.PADDING", "0", "INPUT.GRAYSCALE_PROB", "0.0", "INPUT.FLIP_PROB", "0.0", "INPUT.ERASE_PROB", "0.0",
               "INPUT.COLOR_JITTER", "[0.5, 0.5, 0.5, 0.5]")
    t = TrainTransform(cfg, "visible")
    img = _image()
    a = t(img, torch.Generator().manual_seed(3))
    b = t(img, torch.Generator().manual_seed(3))
    c = t(img, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, _normalised(img), atol=1e-3)


def test_random_erasing_writes_the_fill_into_the_normalised_tensor():
    fill = (0.485, 0.456, 0.406)
    hits = 0
    for s in range(40):
        x = torch.full((3, 32, 16), 7.0)
        random_erase(x, torch.Generator().manual_seed(s), 0.5, (0.2, 0.8), 0.3, fill)
        erased = x[0] != 7.0
        if not erased.any():
            continue
        hits += 1
        for c in range(3):
            assert torch.all(x[c][erased] == torch.tensor(fill[c]))  # raw values, not de-normalised
            assert torch.all(x[c][~erased] == 7.0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        eh, ew = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert erased.sum() == eh * ew  # one rectangle
        assert eh < 32 and ew < 16
        assert 0.2 * 512 * 0.5 <= eh * ew <= 0.8 * 512 * 1.6
    assert 8 <= hits <= 32  # p = 0.5
    x = torch.full((3, 32, 16), 7.0)
    random_erase(x, torch.Generator().manual_seed(0), 0.0, (0.2, 0.8), 0.3, fill)
    assert torch.all(x == 7.0)


def test_erasing_in_the_pipeline_uses_config_fill():
    cfg = _cfg("INPUT.COLOR_JITTER", "[]", "INPUT.PADDING", "0", "INPUT.GRAYSCALE_PROB", "0.0",
               "INPUT.FLIP_PROB", "0.0", "INPUT.ERASE_PROB", "1.0", "INPUT.ERASE_AREA", "[0.3, 0.3]",
               "INPUT.ERASE_FILL", "[0.0, 0.5, 1.0]")
    img = np.full((32, 16, 3), 200, dtype=np.uint8)
    out = TrainTransform(cfg, "visible")(img, torch.Generator().manual_seed(1))
    base = _normalised(img)
    erased = ~torch.isclose(out[0], base[0])
    assert erased.any()
    assert torch.all(out[1][erased] == 0.5) and torch.all(out[2][erased] == 1.0) and torch.all(out[0][erased] == 0.0)
    assert abs(int(erased.sum()) - 0.3 * 512) < 0.3 * 512 * 0.5


def test_channel_augmentations():
    x = torch.stack([torch.full((4, 2), v) for v in (1.0, 2.0, 3.0)])
    seen = set()
    for s in range(30):
        y = channel_exchange(x, torch.Generator().manual_seed(s))
        assert torch.all(y == y[0:1]) and float(y[0, 0, 0]) in (1.0, 2.0, 3.0)
        seen.add(float(y[0, 0, 0]))
    assert seen == {1.0, 2.0, 3.0}
    outcomes = set()
    for s in range(80):
        y = channel_adap_gray(x, torch.Generator().manual_seed(s), 1.0)
        outcomes.add(round(float(y[0, 0, 0]), 4))
        assert torch.all(y == y[0:1])
    assert outcomes == {1.0, 2.0, 3.0, round(0.2989 + 2 * 0.587 + 3 * 0.114, 4)}
    unchanged = [torch.equal(channel_adap_gray(x, torch.Generator().manual_seed(s), 0.0), x) for s in range(80)]
    assert 5 < sum(unchanged) < 40  # idx 3 with p = 0 leaves the image as it is


@pytest.mark.parametrize("modality", ["visible", "infrared"])
def test_caj_switches_per_modality(modality):
    cfg = _cfg("INPUT.COLOR_JITTER", "[]", "INPUT.PADDING", "0", "INPUT.GRAYSCALE_PROB", "0.0",
               "INPUT.FLIP_PROB", "0.0", "INPUT.ERASE_PROB", "0.0", "INPUT.CHANNEL_EXCHANGE", "1.0",
               "INPUT.CHANNEL_ADAP_GRAY", "0.5")
    t = TrainTransform(cfg, modality)
    assert (t.channel_exchange > 0) == (modality == "visible")
    assert (t.channel_adap_gray > 0) == (modality == "infrared")
    img = _image()
    replicated = 0
    for s in range(20):
        out = t(img, torch.Generator().manual_seed(s))
        replicated += bool(torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]))
    assert replicated == 20 if modality == "visible" else 10 <= replicated <= 20


def test_unseeded_call_uses_torch_rng():
    t = TrainTransform(_cfg(), "visible")
    torch.manual_seed(0)
    a = t(_image())
    torch.manual_seed(0)
    assert torch.equal(a, t(_image()))


def test_torchvision_style_erasing_equals_torchvision_random_erasing():
    """INPUT.ERASE_STYLE torchvision (FusionReID) draws exactly what torchvision's
    RandomErasing(value="random") draws from the same RNG state."""
    from utils.compat import torchvision  # noqa: F401
    from torchvision.transforms import RandomErasing

    from data.transforms import random_erase_torchvision

    reference = RandomErasing(p=0.5, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
    erased = 0
    for seed in range(60):
        x = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(1000 + seed))
        torch.manual_seed(seed)
        want = reference(x.clone())
        got = random_erase_torchvision(x.clone(), torch.Generator().manual_seed(seed), 0.5, (0.02, 1 / 3), 0.3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        erased += not torch.equal(got, x)
    assert 15 < erased < 45  # p = 0.5: both branches exercised
