"""End-to-end tests of the assembled models (CMFN, baseline) under the model contract
(``model(images, modality)``: a dict of training outputs in train mode, a dict of
L2-normalised embedding sets in eval mode), the registry, load_model and the ImageNet weight
loading. Tiny ResNet-18 models on 64x32 images, no pretrained weights unless a fake weight
file is made in tmp_path."""
import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loss.orthogonality import orthogonality_loss
from model import MODELS, ReIDModel, build_model, load_model
from model.cmfn.baseline import Baseline
from model.cmfn.cmfn import CMFN
from model.heads import BNNeckHead
from model.pretrained import PretrainedWeightsError, find_imagenet_weights
from engine.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from utils.compat import torchvision  # noqa: F401
from utils.config import ConfigError, build_config
import torchvision.models

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
H, W, B, C = 64, 32, 2, 7


def tiny_cfg(name="cmfn", dataset="sysu", *opts):
    return build_config(dataset, opts=[
        "MODEL.NAME", name, "MODEL.BACKBONE", "resnet18", "MODEL.PRETRAINED", "False",
        "MODEL.CMFN.DROPOUT", "0.0", "MODEL.CMFN.DROP_PATH", "0.0", *opts,
    ])


def tiny_model(name="cmfn", dataset="sysu", *opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(name, dataset, *opts), C)


def images(n, seed):
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def paired(x_vis, x_ir):
    """A paired batch: the visible images, then the infrared ones, and their modality ids."""
    modality = torch.cat([torch.zeros(len(x_vis), dtype=torch.int64), torch.ones(len(x_ir), dtype=torch.int64)])
    return torch.cat([x_vis, x_ir]), modality


# the embedding sets of each copy, [orig, branch1, branch2]
POOL_SETS, BN_SETS = ("pool_orig", "pool_br1", "pool_br2"), ("bn_orig", "bn_br1", "bn_br2")


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
    out = model(*paired(images(B, 1), images(B, 2)))
    assert tuple(out) == model.train_outputs == ("pool", "logits", "ort")
    pool, logits, loss_ort = out["pool"], out["logits"], out["ort"]
    assert pool.shape == (copies * 2 * B, dim) and logits.shape == (copies * 2 * B, C)
    assert loss_ort.shape == ()
    (logits.sum() + pool.sum() + loss_ort).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert model.embedding_sets == (POOL_SETS[0], BN_SETS[0], POOL_SETS[1], BN_SETS[1], POOL_SETS[2],
                                    BN_SETS[2])[:2 * copies]
    with torch.no_grad():
        for modality in ("visible", "infrared"):
            sets = model(images(3, 3), modality=modality)
            assert tuple(sets) == model.embedding_sets
            for out in sets.values():
                assert out.shape == (3, dim)
                torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


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
        out = bn_frozen_train(cmfn)(*paired(x_vis, x_ir))
        pool, logits = out["pool"], out["logits"]
        cmfn.eval()
        vis = cmfn(x_vis, modality="visible")
        ir = cmfn(x_ir, modality="infrared")
    blocks = pool.split(B)
    for copy in range(3):
        torch.testing.assert_close(F.normalize(blocks[2 * copy]), vis[POOL_SETS[copy]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(F.normalize(blocks[2 * copy + 1]), ir[POOL_SETS[copy]], atol=1e-5, rtol=1e-4)
    # logits = classifier(BNNeck(pool)), row by row.
    expected = cmfn.head.classifier(cmfn.head.bnneck(pool))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(F.normalize(cmfn.head.bnneck(pool[:B])), vis["bn_orig"], atol=1e-5, rtol=1e-4)


def test_per_row_modality_in_any_order():
    """Each row goes through the stem of its own modality id, also when the modalities are
    interleaved, in train mode (BN on running statistics) and in eval mode. The stems are the
    backbone's, shared with CMFN; the baseline is the cheaper model to run them."""
    model = cached_model("baseline")
    x = images(4, 13)
    modality = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        pool = bn_frozen_train(model)(x, modality)["pool"]
        model.eval()
        mixed = model(x, modality)
        vis = model(x[1:3], modality="visible")
        ir = model(x[[0, 3]], modality="infrared")
    for name in model.embedding_sets:
        expected = torch.stack([ir[name][0], vis[name][0], vis[name][1], ir[name][1]])
        torch.testing.assert_close(mixed[name], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(F.normalize(pool), mixed["pool_orig"], atol=1e-5, rtol=1e-4)


def test_eval_copies_are_blocks_in_mbue_order(cmfn):
    """Perturbing MBUE output block k changes exactly the rows of copy k's sets (k = orig,
    branch1, branch2), every row of them, and nothing else."""
    cmfn.eval()
    x, n = images(3, 6), 3
    with torch.no_grad():
        reference = cmfn(x, modality="visible")
        for block in range(3):
            def perturb(module, inputs, output, block=block):
                output = output.clone()
                output[block * n:(block + 1) * n] += 1.0
                return output

            handle = cmfn.mbue.register_forward_hook(perturb)
            try:
                changed = cmfn(x, modality="visible")
            finally:
                handle.remove()
            for copy, names in enumerate(zip(POOL_SETS, BN_SETS)):
                for name in names:
                    differs = (changed[name] - reference[name]).abs().amax(dim=1) > 1e-4
                    assert differs.tolist() == [copy == block] * n, (block, name)
        # Each image's rows depend on that image alone.
        single = cmfn(x[1:2], modality="visible")
    for name in cmfn.embedding_sets:
        torch.testing.assert_close(single[name], reference[name][1:2], atol=1e-5, rtol=1e-4)


def test_loss_ort_matches_a_loop_over_rows(cmfn):
    cmfn.train()
    with torch.no_grad():
        out = cmfn(*paired(images(B, 7), images(B, 8)))
    pool, loss_ort = out["pool"], out["ort"]
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
        assert not torch.allclose(vis["pool_orig"], ir["pool_orig"], atol=1e-4)
        model.backbone.infrared_stem.load_state_dict(model.backbone.visible_stem.state_dict())
        ir = model(x, modality="infrared")
    assert tuple(vis) == tuple(ir) == model.embedding_sets
    for name in model.embedding_sets:
        torch.testing.assert_close(vis[name], ir[name], atol=0, rtol=0)


def test_baseline_rows_and_zero_ort():
    model = cached_model("baseline")
    x_vis, x_ir = images(B, 10), images(B, 11)
    with torch.no_grad():
        out = bn_frozen_train(model)(*paired(x_vis, x_ir))
        pool, loss_ort = out["pool"], out["ort"]
        model.eval()
        vis = model(x_vis, modality="visible")
        ir = model(x_ir, modality="infrared")
    assert loss_ort.item() == 0.0
    torch.testing.assert_close(F.normalize(pool[:B]), vis["pool_orig"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(F.normalize(pool[B:]), ir["pool_orig"], atol=1e-5, rtol=1e-4)
    assert not any(k.startswith(("hce", "mfa", "mbue")) for k in model.state_dict())


def test_forward_contract_errors(cmfn):
    for train in (True, False):
        cmfn.train(train)
        with pytest.raises(ValueError, match="modality"):
            cmfn(images(B, 1), modality="thermal")
    cmfn.eval()


def test_forward_rejects_a_malformed_modality_tensor():
    model = cached_model("baseline").eval()  # the stems are the backbone's, shared with CMFN
    x = images(B, 1)
    for modality in (torch.zeros(B + 1, dtype=torch.int64), torch.full((B,), 2), images(B, 2)):
        with pytest.raises(ValueError, match="modality"):
            with torch.no_grad():
                model(x, modality)


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
    assert {"baseline", "cmfn", "ivreid"} <= set(MODELS.names())
    with pytest.raises(ConfigError, match=r"MODEL\.NAME 'nonexistent' is not a registered model \(known: %s\)"
                                          % ", ".join(MODELS.names())):
        MODELS.get("nonexistent")
    with pytest.raises(ConfigError, match="did you mean 'cmfn'"):
        MODELS.get("cmfm")
    assert MODELS.get("cmfn") is CMFN and MODELS.get("baseline") is Baseline
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("cmfn")(Baseline)
    assert MODELS.get("cmfn") is CMFN

    class TinyTestModel(ReIDModel):
        @classmethod
        def from_config(cls, cfg, num_classes):
            model = cls()
            model.linear = nn.Linear(1, num_classes)
            return model

    MODELS.register("tiny_test_model")(TinyTestModel)
    try:
        assert build_model(tiny_cfg("tiny_test_model"), 3).linear.out_features == 3
        with pytest.raises(ValueError, match="already registered"):
            MODELS.register("tiny_test_model")(TinyTestModel)
        with pytest.raises(ConfigError, match="num_classes must be positive"):
            build_model(tiny_cfg("tiny_test_model"), 0)
    finally:
        MODELS._parts.pop("tiny_test_model")
    assert "tiny_test_model" not in MODELS


def test_param_groups(cmfn):
    """head.* (BNNeck weight, classifier) at lr factor 1; every other trainable parameter at
    SOLVER.BACKBONE_LR_FACTOR; the frozen BNNeck bias in neither."""
    groups = {g["name"]: g for g in cmfn.param_groups(tiny_cfg("cmfn", "sysu", "SOLVER.BACKBONE_LR_FACTOR", "0.25"))}
    assert set(groups) == {"head", "backbone"}
    assert groups["head"]["lr_factor"] == 1.0 and groups["backbone"]["lr_factor"] == 0.25
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["head"] == {id(cmfn.head.bnneck.weight), id(cmfn.head.classifier.weight)}
    rest = {id(p) for n, p in cmfn.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert ids["backbone"] == rest


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
        expected, got = cmfn(x, modality="infrared"), loaded(x, modality="infrared")
    assert tuple(got) == tuple(expected) == CMFN.embedding_sets
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0)

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
        build_model(tiny_cfg("baseline", "sysu", "MODEL.PRETRAINED", "True", "MODEL.DOWNLOAD", "False"), C)
    text = str(info.value)
    assert "MODEL.DOWNLOAD" in text
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
