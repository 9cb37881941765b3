"""End-to-end tests of the assembled models (CMFN, baseline), the factory, load_model and the
ImageNet weight loading. Tiny ResNet-18 models on 64x32 images, no pretrained weights unless a
fake weight file is made in tmp_path."""
import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import MODELS, build_model, load_model, register_model
from model.cmfn import orthogonality_loss
from model.head import BNNeckHead
from model.pretrained import PretrainedWeightsError, find_imagenet_weights
from utils.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from utils.compat import torchvision  # noqa: F401
from utils.config import ConfigError, build_config
import torchvision.models

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
H, W, B, C = 64, 32, 2, 7


def tiny_cfg(name="cmfn", dataset="sysu", *opts):
    return build_config(dataset, opts=[
        "MODEL.NAME", name, "MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False",
        "MODEL.DROPOUT", "0.0", "MODEL.DROP_PATH", "0.0", *opts,
    ])


def tiny_model(name="cmfn", dataset="sysu", *opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(name, dataset, *opts), C)


def images(n, seed):
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def bn_frozen_train(model):
    """Train mode with BatchNorm on running statistics, so rows do not interact."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


_CACHE = {}


def cached_model(name="cmfn", dataset="sysu"):
    """One tiny model per (name, dataset) for the whole module; tests must not modify it."""
    if (name, dataset) not in _CACHE:
        _CACHE[name, dataset] = tiny_model(name, dataset)
    return _CACHE[name, dataset]


@pytest.fixture
def cmfn():
    return cached_model()


@pytest.mark.parametrize("name,dataset,copies,dim", [
    ("cmfn", "sysu", 3, 512), ("cmfn", "regdb", 3, 256), ("baseline", "sysu", 1, 512), ("baseline", "regdb", 1, 256),
])
def test_shapes_and_normalisation(name, dataset, copies, dim):
    model = cached_model(name, dataset)
    assert model.num_copies == copies and model.feat_dim == dim
    assert isinstance(model.head, BNNeckHead)
    model.train()
    pool, logits, loss_ort = model(images(B, 1), images(B, 2))
    assert pool.shape == (copies * 2 * B, dim) and logits.shape == (copies * 2 * B, C)
    assert loss_ort.shape == ()
    (logits.sum() + pool.sum() + loss_ort).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for modality in ("visible", "infrared"):
            out_pool, out_bn = model(images(3, 3), modality=modality)
            for out in (out_pool, out_bn):
                assert out.shape == (copies * 3, dim)
                torch.testing.assert_close(out.norm(dim=1), torch.ones(copies * 3))


def test_regdb_configuration_builds_no_deep_modules():
    model = cached_model("cmfn", "regdb")
    assert model.mbue_after == "layer2"
    for absent in ("mfa3", "dilated_bottleneck"):
        assert not hasattr(model, absent)
    assert not hasattr(model.backbone, "layer4")
    assert not any(".layer4." in k or k.startswith("mfa3") for k in model.state_dict())


def test_train_rows_match_eval_per_modality_and_copy(cmfn):
    """Row order [vis_orig, ir_orig, vis_br1, ir_br1, vis_br2, ir_br2], checked against eval calls."""
    x_vis, x_ir = images(B, 4), images(B, 5)
    with torch.no_grad():
        pool, logits, _ = bn_frozen_train(cmfn)(x_vis, x_ir)
        cmfn.eval()
        vis_pool, vis_bn = cmfn(x_vis, modality="visible")
        ir_pool, _ = cmfn(x_ir, modality="infrared")
    blocks = pool.split(B)
    for copy in range(3):
        torch.testing.assert_close(F.normalize(blocks[2 * copy]), vis_pool[copy * B:(copy + 1) * B], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(F.normalize(blocks[2 * copy + 1]), ir_pool[copy * B:(copy + 1) * B], atol=1e-5, rtol=1e-4)
    # logits = classifier(BNNeck(pool)), row by row.
    expected = cmfn.head.classifier(cmfn.head.bnneck(pool))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(F.normalize(cmfn.head.bnneck(pool[:B])), vis_bn[:B], atol=1e-5, rtol=1e-4)


def test_eval_copies_are_blocks_in_mbue_order(cmfn):
    """Perturbing MBUE output block k changes exactly eval rows [kN, (k+1)N)."""
    cmfn.eval()
    x, n = images(3, 6), 3
    with torch.no_grad():
        reference = cmfn(x, modality="visible")[0]
        for block in range(3):
            def perturb(module, inputs, output, block=block):
                output = output.clone()
                output[block * n:(block + 1) * n] += 1.0
                return output

            handle = cmfn.mbue.register_forward_hook(perturb)
            try:
                changed = cmfn(x, modality="visible")[0]
            finally:
                handle.remove()
            differs = (changed - reference).abs().amax(dim=1) > 1e-4
            assert differs.tolist() == [block * n <= r < (block + 1) * n for r in range(3 * n)]
        # Each image's three rows depend on that image alone.
        single = cmfn(x[1:2], modality="visible")[0]
    torch.testing.assert_close(single, reference[[1, n + 1, 2 * n + 1]], atol=1e-5, rtol=1e-4)


def test_loss_ort_matches_a_loop_over_rows(cmfn):
    cmfn.train()
    with torch.no_grad():
        pool, _, loss_ort = cmfn(images(B, 7), images(B, 8))
    n = 2 * B
    expected = sum(float(torch.dot(pool[n + i].double(), pool[2 * n + i].double())) for i in range(n)) / (3 * n)
    assert loss_ort.item() == pytest.approx(expected, rel=1e-5)


def test_orthogonality_loss_golden():
    golden = torch.load(os.path.join(GOLDEN, "losses.pt"), weights_only=True)
    value = orthogonality_loss(golden["inputs"]["feat"])
    torch.testing.assert_close(value, golden["outputs_eval"]["ort"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cmfn", "baseline"])
def test_modalities_differ_only_through_the_stem(name):
    model = copy.deepcopy(cached_model(name)).eval()
    x = images(2, 9)
    with torch.no_grad():
        vis = model(x, modality="visible")
        ir = model(x, modality="infrared")
        assert not torch.allclose(vis[0], ir[0], atol=1e-4)
        model.backbone.infrared_stem.load_state_dict(model.backbone.visible_stem.state_dict())
        ir = model(x, modality="infrared")
    for a, b in zip(vis, ir):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_baseline_rows_and_zero_ort():
    model = cached_model("baseline")
    x_vis, x_ir = images(B, 10), images(B, 11)
    with torch.no_grad():
        pool, _, loss_ort = bn_frozen_train(model)(x_vis, x_ir)
        model.eval()
        vis_pool, _ = model(x_vis, modality="visible")
        ir_pool, _ = model(x_ir, modality="infrared")
    assert loss_ort.item() == 0.0
    torch.testing.assert_close(F.normalize(pool[:B]), vis_pool, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(F.normalize(pool[B:]), ir_pool, atol=1e-5, rtol=1e-4)
    assert not any(k.startswith(("hce", "mfa", "mbue")) for k in model.state_dict())


def test_forward_contract_errors(cmfn):
    cmfn.train()
    with pytest.raises(ValueError, match="x_vis, x_ir"):
        cmfn(images(B, 1))
    cmfn.eval()
    with pytest.raises(ValueError, match="modality"):
        cmfn(images(B, 1), modality="thermal")
    with pytest.raises(ValueError, match="one batch"):
        cmfn(images(B, 1), images(B, 2))


def test_head_initialisation():
    torch.manual_seed(0)
    head = BNNeckHead(2048, 395)
    assert not head.bnneck.bias.requires_grad and torch.count_nonzero(head.bnneck.bias) == 0
    assert head.bnneck.weight.requires_grad
    assert head.bnneck.weight.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert head.bnneck.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert head.classifier.bias is None
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)


def test_last_stride_and_widths(cmfn):
    net = cmfn.backbone
    assert net.stage_channels == (64, 64, 128, 256, 512)
    assert net.layer4[0].conv1.stride == (1, 1) and net.layer4[0].downsample[0].stride == (1, 1)
    strided = build_model(tiny_cfg("baseline", "sysu", "MODEL.LAST_STRIDE", "2"), C).backbone
    assert strided.layer4[0].conv1.stride == (2, 2)
    x = torch.zeros(1, 3, H, W)
    assert net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x, "visible"))))).shape[-2:] == (H // 16, W // 16)


def test_registry():
    with pytest.raises(ConfigError, match="not a registered model"):
        build_model(tiny_cfg("nonexistent"), C)

    @register_model("tiny_test_model")
    def build(cfg, num_classes):
        return nn.Linear(1, num_classes)

    try:
        assert build_model(tiny_cfg("tiny_test_model"), 3).out_features == 3
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny_test_model")(build)
    finally:
        MODELS.pop("tiny_test_model")


def test_load_model_roundtrip(tmp_path, cmfn):
    cfg = tiny_cfg().clone()
    cfg.defrost()
    # Saved with ImageNet loading on and a path that does not exist: load_model must not look.
    cfg.MODEL.PRETRAINED = True
    cfg.MODEL.PRETRAIN_PATH = str(tmp_path / "nowhere.pth")
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, make_checkpoint(cmfn.state_dict(), cfg, C, epoch=3))
    loaded = load_model(path)
    assert not loaded.training and loaded.cfg.MODEL.PRETRAINED is False
    cmfn.eval()
    x = images(2, 12)
    with torch.no_grad():
        for a, b in zip(cmfn(x, modality="infrared"), loaded(x, modality="infrared")):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    # Saved from a DDP-wrapped model: the wrapper prefix is removed.
    wrapped = {"module." + k: v for k, v in cmfn.state_dict().items()}
    save_checkpoint(path, make_checkpoint(wrapped, tiny_cfg(), C))
    assert load_model(path).feat_dim == cmfn.feat_dim

    state = dict(cmfn.state_dict())
    state.pop("head.classifier.weight")
    save_checkpoint(path, make_checkpoint(state, tiny_cfg(), C))
    with pytest.raises(CheckpointError, match="head.classifier.weight"):
        load_model(path)


# ImageNet weights -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_imagenet():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def check_imagenet_copy(backbone, state):
    for stem in (backbone.visible_stem, backbone.infrared_stem):
        assert torch.equal(stem.conv.weight, state["conv1.weight"])
        assert torch.equal(stem.bn.running_var, state["bn1.running_var"])
    assert torch.equal(backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])


def test_imagenet_weights_from_path(tmp_path, fake_imagenet, caplog, no_download):
    path = str(tmp_path / "r18.pth")
    torch.save(fake_imagenet, path)
    caplog.set_level(logging.INFO, logger="cmfn")
    model = build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True", "MODEL.PRETRAIN_PATH", path), C)
    check_imagenet_copy(model.backbone, fake_imagenet)
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "cmfn")
    assert "0 missing" in message and "fc.weight" in message and path in message
    # RegDB configuration: no layer4 in the model, so the file's layer4 is unused, not an error.
    caplog.clear()
    regdb = build_model(tiny_cfg("cmfn", "regdb", "MODEL.PRETRAINED", "True", "MODEL.PRETRAIN_PATH", path), C)
    check_imagenet_copy(regdb.backbone, fake_imagenet)
    assert "layer4" in " ".join(r.getMessage() for r in caplog.records)


def test_imagenet_weights_from_hub_cache(tmp_path, fake_imagenet, monkeypatch, no_download):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as info:
        build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True"), C)
    text = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-5c106cde.pth" in text
    assert os.path.join(str(tmp_path), "checkpoints") in text
    assert "MODEL.PRETRAIN_PATH" in text and "MODEL.PRETRAINED False" in text

    os.makedirs(tmp_path / "checkpoints")
    newer = str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    torch.save(fake_imagenet, newer)
    assert find_imagenet_weights("resnet18") == newer
    model = build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True"), C)
    check_imagenet_copy(model.backbone, fake_imagenet)
    older = str(tmp_path / "checkpoints" / "resnet18-5c106cde.pth")
    torch.save({}, older)
    assert find_imagenet_weights("resnet18") == older


def test_imagenet_weight_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        find_imagenet_weights("resnet50", str(tmp_path / "missing.pth"))
    bad = str(tmp_path / "bad.pth")
    torch.save({"epoch": 1}, bad)
    with pytest.raises(PretrainedWeightsError, match="not a torchvision ResNet state dict"):
        build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True", "MODEL.PRETRAIN_PATH", bad), C)
    r50 = str(tmp_path / "r50.pth")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(ValueError, match="shape"):
        build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True", "MODEL.PRETRAIN_PATH", r50), C)
