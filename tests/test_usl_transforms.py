"""The unsupervised recipe's augmentations against the released code's golden cases
(tests/golden/cmag/channel_aug.pt, transforms.pt): channel augmentations with their Python
``random`` call logs, the nine training views, the clustering and evaluation transforms."""
import os
import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from yacs.config import CfgNode as CN

from data.channel_aug import ChannelAdap, ChannelAdapGray, ChannelExchange, ChannelRandomErasing, Gray
from data.usl_transforms import (LAYOUTS, REFERENCE_RECIPES, AugRng, ClusterTransform, EvalTransform,
                                 build_train_views, params_from_config, reference_params)
from utils.compat import torchvision
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cmag")
AUG = torch.load(os.path.join(GOLDEN, "channel_aug.pt"), weights_only=True)
TRANSFORMS = torch.load(os.path.join(GOLDEN, "transforms.pt"), weights_only=True)
IMAGE = TRANSFORMS["inputs"]["image_uint8_HWC"].numpy()
GOLDEN_SIZE = (TRANSFORMS["params"]["height"], TRANSFORMS["params"]["width"])
# Pillow's resampling and colour adjustments are bit-exact only with the golden's versions;
# otherwise the README's tolerance applies (1/255 in pixel units, after normalisation).
SAME_LIBS = (PIL.__version__ == TRANSFORMS["environment"]["pillow"]
             and torchvision.__version__.split("+")[0] == TRANSFORMS["environment"]["torchvision"].split("+")[0])
ATOL = 0.0 if SAME_LIBS else 1.0 / 255 / 0.225

CHANNEL_AUGS = {
    "ChannelExchange(gray=2)": ChannelExchange(gray=2),
    "ChannelAdapGray(probability=0.5)": ChannelAdapGray(0.5),
    "ChannelRandomErasing(probability=0.5)": ChannelRandomErasing(0.5),
    "ChannelAdap(probability=0.5)": ChannelAdap(0.5),
    "Gray()": Gray(),
}
# (pipeline, view) names of transforms.pt -> (recipe, stage) and view of this project.
STAGES = {"sysu_stage1": ("sysu", "stage1"), "sysu_stage2": ("sysu", "stage2"),
          "regdb_stage1_and_2": ("regdb", "stage1")}
VIEW = {"train_transformer_rgb": "rgb", "train_transformer_rgb1": "rgb2", "transform_thermal": "ir"}
STEP_OF = {"Resize": "resize", "Pad": "pad", "RandomCrop": "crop", "RandomHorizontalFlip": "flip",
           "ColorJitter": "jitter", "ToTensor": "tensor", "<ChannelAug.ChannelRandomErasing": "erase",
           "<ChannelAug.ChannelExchange": "exchange", "<ChannelAug.ChannelAdapGray": "adap_gray"}


class LoggedRandom:
    """random.Random(seed) that records [name, args, result] of every call."""

    def __init__(self, seed):
        self.rng, self.calls = random.Random(seed), []

    def randint(self, a, b):
        v = self.rng.randint(a, b)
        self.calls.append(["randint", [a, b], v])
        return v

    def uniform(self, a, b):
        v = self.rng.uniform(a, b)
        self.calls.append(["uniform", [a, b], v])
        return v


@pytest.mark.parametrize("case", AUG["cases"], ids=lambda c: "%s-%d" % (c["transform"], c["python_random_seed"]))
def test_channel_aug_matches_golden_output_and_random_calls(case):
    rng = LoggedRandom(case["python_random_seed"])
    x = AUG["inputs"]["x"].clone()
    out = CHANNEL_AUGS[case["transform"]](x, rng)
    assert torch.equal(out, case["output"])
    assert rng.calls == case["random_calls"]
    assert case["in_place"] and out.data_ptr() == x.data_ptr() and torch.equal(x, case["output"])


def test_channel_aug_default_draws_from_the_global_random_module():
    case = next(c for c in AUG["cases"] if c["transform"].startswith("ChannelRandomErasing")
                and len(c["random_calls"]) > 1)
    random.seed(case["python_random_seed"])
    out = ChannelRandomErasing(0.5)(AUG["inputs"]["x"].clone())
    after = random.getstate()
    assert torch.equal(out, case["output"])
    replay = random.Random(case["python_random_seed"])
    for name, args, _ in case["random_calls"]:
        getattr(replay, name)(*args)
    assert replay.getstate() == after  # exactly the logged draws, no more


def test_channel_erasing_fills_only_the_first_channel_of_a_single_channel_image():
    x = torch.zeros(1, 30, 20)
    out = ChannelRandomErasing(0.5)(x, random.Random(1))  # seed 1 erases (its first uniform is 0.134)
    assert out.shape == (1, 30, 20)
    assert sorted(out.unique().tolist()) == [0.0, torch.tensor(0.4914).item()]


def test_channel_exchange_with_gray_3_reaches_the_grey_branch():
    x = torch.randn(3, 4, 5)
    seeds = [s for s in range(50) if random.Random(s).randint(0, 3) == 3]
    out = ChannelExchange(gray=3)(x.clone(), random.Random(seeds[0]))
    grey = 0.2989 * x[0] + 0.5870 * x[1] + 0.1140 * x[2]
    assert all(torch.equal(out[c], grey) for c in range(3))


def _pipelines():
    return [(p["pipeline"], p["view"], s) for p in TRANSFORMS["pipelines"] for s in range(3)]


@pytest.mark.parametrize("pipeline,view,seed", _pipelines())
def test_training_views_match_golden(pipeline, view, seed):
    golden = next(p for p in TRANSFORMS["pipelines"] if p["pipeline"] == pipeline and p["view"] == view)
    expected = golden["outputs_seed_0_1_2"][seed]
    params = reference_params(*STAGES[pipeline])._replace(size=GOLDEN_SIZE)
    transform = build_train_views(params)[VIEW[view]]
    private = transform(IMAGE, AugRng.from_seed(seed))
    random.seed(seed)
    torch.manual_seed(seed)
    released = transform(IMAGE, AugRng.global_state())
    for out in (private, released):
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert torch.allclose(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("pipeline,view", sorted({(p, v) for p, v, _ in _pipelines()}))
def test_layout_table_is_the_golden_pipeline(pipeline, view):
    """The steps and resize filter of each (stage, view) are those the golden recorded."""
    golden = next(p for p in TRANSFORMS["pipelines"] if p["pipeline"] == pipeline and p["view"] == view)
    lines = [ln.strip() for ln in golden["repr"].splitlines()[1:-1]]
    steps = [STEP_OF[ln.split("(")[0].split(" ")[0]] for ln in lines if not ln.startswith("Normalize")]
    params = reference_params(*STAGES[pipeline])
    assert list(LAYOUTS[params.layout][VIEW[view]]) == steps
    resize = next(ln for ln in lines if ln.startswith("Resize"))
    assert "interpolation=%s" % params.resize in resize
    assert "padding=%d" % params.padding in next(ln for ln in lines if ln.startswith("Pad"))


def test_camera_local_runs_use_the_stage2_layout_and_regdb_one_layout_for_both_stages():
    assert reference_params("sysu", "camera") == reference_params("sysu", "stage2")
    assert reference_params("regdb", "stage1") == reference_params("regdb", "stage2")
    assert {p.size for p in REFERENCE_RECIPES.values()} == {(384, 128)}
    with pytest.raises(ConfigError, match="regdb camera"):
        reference_params("regdb", "camera")


def test_cluster_and_eval_transforms_match_golden():
    size = GOLDEN_SIZE
    cluster = ClusterTransform(size)(IMAGE)
    assert torch.allclose(cluster, TRANSFORMS["cluster_extraction_transform"]["output"], rtol=0, atol=ATOL)
    ev = EvalTransform(size)
    resized = torch.from_numpy(ev.resized(IMAGE))
    lanczos = TRANSFORMS["evaluation_transform"]["pil_lanczos_resize_uint8"]
    assert (resized.int() - lanczos.int()).abs().max() <= (0 if SAME_LIBS else 1)
    assert torch.allclose(ev(IMAGE), TRANSFORMS["evaluation_transform"]["output"], rtol=0, atol=ATOL)


def test_eval_transform_equals_the_project_test_transform(tmp_path):
    """The released test preprocessing at SIZE_TEST [H, W] is the project's LANCZOS TestTransform."""
    from data.transforms import TestTransform
    from utils.config import build_config

    path = str(tmp_path / "img.png")
    Image.fromarray(IMAGE).save(path)
    cfg = build_config(opts=["INPUT.RESIZE_FILTER", "lanczos", "INPUT.SIZE_TEST", "[48, 16]"], validate=False)
    assert torch.equal(TestTransform(cfg)(path), EvalTransform((48, 16))(path))


def test_inputs_as_path_pil_or_array_give_the_same_views(tmp_path):
    path = str(tmp_path / "img.png")
    Image.fromarray(IMAGE).save(path)
    view = build_train_views(reference_params("sysu", "stage2")._replace(size=GOLDEN_SIZE))["rgb2"]
    outs = [view(x, AugRng.from_seed(7)) for x in (path, Image.fromarray(IMAGE), IMAGE)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_seeded_views_are_deterministic_and_leave_the_global_generators_alone():
    views = build_train_views(reference_params("sysu", "stage1")._replace(size=GOLDEN_SIZE))
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    first = [views[v](IMAGE, AugRng.from_seed(123)) for v in ("rgb", "rgb2", "ir")]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    torch.rand(5)
    random.random()
    again = [views[v](IMAGE, AugRng.from_seed(123)) for v in ("rgb", "rgb2", "ir")]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    others = [views["rgb2"](IMAGE, AugRng.from_seed(s)) for s in range(124, 130)]
    assert any(not torch.equal(first[1], o) for o in others)


def test_view2_is_always_single_channel():
    view = build_train_views(reference_params("sysu", "stage1")._replace(size=GOLDEN_SIZE))["rgb2"]
    for s in range(8):
        x = view(IMAGE, AugRng.from_seed(s))
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def _usl_cfg(**over):
    inp = {"SIZE": [384, 128], "RESIZE_FILTER": "bicubic", "LAYOUT_STAGE1": "jitter_view2",
           "LAYOUT_CAMERA": "jitter_first", "LAYOUT_STAGE2": "jitter_first", "PADDING": 10, "FLIP_PROB": 0.5,
           "COLOR_JITTER": [0.5, 0.5, 0.5, 0.5], "ERASE_PROB": 0.5, "ADAP_GRAY_PROB": 0.5, "EXCHANGE_GRAY": 2}
    inp.update(over)
    return CN({"USL": {"INPUT": inp},
               "INPUT": {"PIXEL_MEAN": [0.485, 0.456, 0.406], "PIXEL_STD": [0.229, 0.224, 0.225]}})


def test_params_from_config_defaults_are_the_reference_table():
    for stage in ("stage1", "camera", "stage2"):
        assert params_from_config(_usl_cfg(), stage) == reference_params("sysu", stage)
    regdb = _usl_cfg(RESIZE_FILTER="bilinear", LAYOUT_STAGE1="jitter_first")
    for stage in ("stage1", "stage2"):
        assert params_from_config(regdb, stage) == reference_params("regdb", stage)


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="USL.INPUT.LAYOUT_STAGE2"):
        params_from_config(_usl_cfg(LAYOUT_STAGE2="sideways"), "stage2")
    with pytest.raises(ConfigError, match="USL.INPUT.COLOR_JITTER"):
        params_from_config(_usl_cfg(COLOR_JITTER=[0.5]), "stage1")
    with pytest.raises(ConfigError, match="USL.INPUT.RESIZE_FILTER"):
        build_train_views(params_from_config(_usl_cfg(RESIZE_FILTER="nearest"), "stage1"))


def test_zero_jitter_and_flip_probabilities_switch_those_steps_off():
    params = reference_params("sysu", "stage2")._replace(size=GOLDEN_SIZE, jitter=(0, 0, 0, 0), flip_prob=0.0,
                                                           erase_prob=0.0)
    rgb = build_train_views(params, views=("rgb",))["rgb"]
    plain = build_train_views(reference_params("sysu", "stage1")._replace(
        size=GOLDEN_SIZE, flip_prob=0.0, erase_prob=0.0), views=("rgb",))["rgb"]
    # With no jitter factors only the jitter's order permutation is drawn first.
    g = torch.Generator().manual_seed(3)
    torch.randperm(4, generator=g)
    assert torch.equal(rgb(IMAGE, AugRng.from_seed(3)), plain(IMAGE, AugRng(g, random.Random(3))))
    assert np.isfinite(rgb(IMAGE, AugRng.from_seed(3)).numpy()).all()
