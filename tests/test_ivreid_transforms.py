"""The IV-REID test transform against the reference's (tests/golden/ivreid/transforms.pt).

The reference resizes every test image to 384x128 with PIL's bilinear filter (the
antialiased one torchvision's ``Resize`` uses for PIL images, aspect ratio not kept), then
``ToTensor`` and ``Normalize`` with the ImageNet mean and std. The golden file holds two
synthetic source images (144x288 and 64x128, uint8 HxWx3), the PIL output of the resize
(``resized``, made with Pillow 13) and a digest of the final tensor, which the reference
found bit-identical to ``(resized.permute(2, 0, 1).float() / 255 - mean) / std``.

Here each source is written to a lossless PNG and read back through this project's
``TestTransform`` with the ``ivreid`` preset; the result must equal that formula bit for
bit, and the CMFN preset must still resize with LANCZOS.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import TestTransform
from ivreid_golden import GOLDEN, digest
from utils.config import build_config

CASES = ["sysu_like_144x288", "regdb_like_64x128"]


@pytest.fixture(scope="module")
def case():
    path = GOLDEN / "transforms.pt"
    assert path.is_file(), ("%s is missing: copy transforms.pt of the IV-REID golden set into "
                            "tests/golden/ivreid/" % path)
    return torch.load(path, weights_only=True)


def write_png(tmp_path, name, array):
    path = tmp_path / ("%s.png" % name)
    Image.fromarray(array.numpy()).save(path)
    # lossless: the file decodes to the source exactly
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), array.numpy())
    return str(path)


def normalised(resized, mean, std):
    """(resized [H, W, 3] uint8 -> [3, H, W] float32 / 255 - mean) / std, as the reference."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (resized.permute(2, 0, 1).float().div(255) - mean) / std


def test_preset_matches_the_reference_settings(case):
    args = case["init_args"]
    for dataset in ("sysu", "regdb"):
        cfg = build_config(dataset, method="ivreid")
        assert list(cfg.INPUT.SIZE_TEST) == args["SIZE_TEST"] == [384, 128]
        assert cfg.INPUT.RESIZE_FILTER == "bilinear"
        assert list(cfg.INPUT.PIXEL_MEAN) == args["NORMALIZATION_MEAN"]
        assert list(cfg.INPUT.PIXEL_STD) == args["NORMALIZATION_STD"]
    assert "interpolation=bilinear" in case["pipelines"]["test"]


@pytest.mark.parametrize("name", CASES)
def test_ivreid_test_transform_is_bit_exact(case, tmp_path, name):
    cfg = build_config("sysu", method="ivreid")
    source = case["inputs"][name]["source"]
    expected = case["outputs_eval"][name]
    assert expected["output_equals_formula"]
    out = TestTransform(cfg)(write_png(tmp_path, name, source))
    assert out.dtype == torch.float32 and out.shape == (3, 384, 128) and out.is_contiguous()
    reference = normalised(expected["resized"], cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    assert torch.equal(out, reference)
    # and the reference's own digest of its final tensor
    stats, head = digest([out])
    assert torch.allclose(stats[0], expected["output_digest"]["stats"], rtol=1e-12, atol=0)
    assert torch.equal(head[0], expected["output_digest"]["head"])


@pytest.mark.parametrize("name", CASES)
def test_cmfn_preset_still_resizes_with_lanczos(case, tmp_path, name):
    cfg = build_config("sysu", opts=["INPUT.SIZE_TEST", "[384, 128]"])
    assert cfg.METHOD == "cmfn" and cfg.INPUT.RESIZE_FILTER == "lanczos"
    source = case["inputs"][name]["source"]
    out = TestTransform(cfg)(write_png(tmp_path, name, source))
    lanczos = Image.fromarray(source.numpy()).resize((128, 384), Image.LANCZOS)
    expected = normalised(torch.from_numpy(np.array(lanczos)), cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    assert torch.equal(out, expected)
    # the two filters give different pixels, so the comparison above tells them apart
    bilinear = normalised(case["outputs_eval"][name]["resized"], cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    assert not torch.equal(out, bilinear)
