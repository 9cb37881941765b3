"""The IV-REID model against the golden tensors of the reference code (tests/golden/ivreid/).

* ``bottleneck_s{1,2}.pt``: two reference bottlenecks with conv biases, against torchvision's
  Bottleneck (the backbone's block) given biases by ``add_conv_biases``;
* ``idenet.pt``: the two auxiliary modality classifiers;
* ``model_forward.pt``: the whole network (ResNet-50, C = 16) on 8 images at 384x128. Its
  weights and images are regenerated from the rule of tests/golden/ivreid/README.md under the
  reference's key names (checked against the stored digests), passed through the
  checkpoint converter's key mapping, and the eval outputs (float32), the train outputs
  (float64, against the reference's float64 run), the auxiliary outputs and the BN buffers
  after one train forward are compared;
* ``state_dict_keys.txt``: every key and shape of the reference model, for SYSU and RegDB.

The golden files were made at 1 intra-op thread; the tolerances are those the README
recommends for each quantity.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ivreid_golden import GOLDEN, digest, golden, rule_images, rule_reference_state
from model.backbones.single_stream import SingleStreamResNet, add_conv_biases
from model.heads import BNNeckHead
from model.ivreid import IVReID, ModalityClassifier
from model.ivreid_convert import map_reference_state_dict, project_key
from model.registry import MODELS
from utils.compat import torchvision  # noqa: F401  (makes torchvision.models importable)
from utils.config import get_default_config, merge_from_list
from utils.errors import ConfigError
from torchvision.models.resnet import Bottleneck, conv1x1

RTOL, ATOL = 1e-5, 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def close(mine, theirs, rtol=RTOL, atol=ATOL):
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs, rtol=rtol, atol=atol), (mine - theirs).abs().max().item()


def ivreid_cfg(*opts):
    cfg = get_default_config()
    merge_from_list(cfg, ["MODEL.NAME", "ivreid", "MODEL.PRETRAINED", "False", *opts])
    return cfg


def tiny_model(num_classes=5, *opts):
    return IVReID.from_config(ivreid_cfg("MODEL.BACKBONE", "resnet18", "MODEL.IVREID.AUX_DIM", "8", *opts),
                              num_classes)


# --- small modules --------------------------------------------------------------------------

def reference_stage(inplanes, planes, blocks, stride):
    """What the reference's ResNet._make_layer builds, from torchvision's Bottleneck."""
    shortcut = nn.Sequential(conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                             nn.BatchNorm2d(planes * Bottleneck.expansion))
    rest = [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(Bottleneck(inplanes, planes, stride, shortcut), *rest)


@pytest.mark.parametrize("name", ["bottleneck_s1.pt", "bottleneck_s2.pt"])
def test_bottlenecks_with_conv_bias(name):
    case = golden(name)
    a = case["init_args"]

    def build():
        stage = reference_stage(a["inplanes"], a["planes"], a["blocks"], a["stride"])
        # 3 convs per block and the shortcut conv of the first.
        assert add_conv_biases(stage) == 3 * a["blocks"] + 1
        stage.load_state_dict(case["state_dict"])
        return stage

    x = case["inputs"]["x"]
    stage = build().eval()
    with torch.no_grad():
        close(stage(x.clone()), case["outputs_eval"]["out"])
    stage = build().train()
    with torch.no_grad():
        close(stage(x.clone()), case["outputs_train"]["out"])
    state = stage.state_dict()
    for key, value in case["buffers_after_train"].items():
        if key.endswith("num_batches_tracked"):
            assert state[key].item() == value.item() == 1, key
        else:
            close(state[key], value)


def capture(module):
    """The outputs of `module`'s forward calls, in order."""
    outputs = []
    module.register_forward_hook(lambda m, inputs, output: outputs.append(output))
    return outputs


def test_aux_heads_match_reference():
    case = golden("idenet.pt")
    a = case["init_args"]
    mapped, _ = map_reference_state_dict({"ide_net." + k: v for k, v in case["state_dict"].items()})

    def build():
        heads = nn.ModuleDict({name: ModalityClassifier(a["in_planes"], 512, a["num_classes"])
                               for name in ("aux_visible", "aux_infrared")})
        heads.load_state_dict(mapped)
        return heads

    x = case["inputs"]["x"]
    for mode, expected in (("eval", case["outputs_eval"]), ("train", case["outputs_train"])):
        heads = build().train(mode == "train")
        hidden = {name: capture(heads[name].fc1) for name in heads}
        with torch.no_grad():
            for name, prefix in (("aux_visible", "rgb"), ("aux_infrared", "ir")):
                close(heads[name](x), expected["fix.%s_score" % prefix])
                close(hidden[name][0], expected["fix.%s_fc1" % prefix])
    state = heads.state_dict()
    for key, value in case["buffers_after_train"]["fix"].items():
        assert torch.allclose(state[project_key("ide_net." + key)].double(), value.double(), rtol=RTOL, atol=ATOL), key


# --- the full model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def forward_case():
    case = golden("model_forward.pt")
    reference = rule_reference_state(case["state_dict_keys"], case["aux_state_dict_keys"])
    images = rule_images()
    mapped, folded = map_reference_state_dict(reference)
    assert folded == 0
    return case, reference, images, mapped


def test_rule_regeneration_matches_digests(forward_case):
    case, reference, images, _ = forward_case
    for table, prefix in ((case["state_dict_digest"], ""), (case["aux_state_dict_digest"], "ide_net.")):
        tensors = [reference[prefix + k] for k in table["keys"]]
        assert [t.numel() for t in tensors] == table["numel"].tolist()
        stats, head = digest(tensors)
        assert torch.allclose(stats, table["stats"], rtol=1e-12, atol=0)
        assert torch.equal(head.isnan(), table["head"].isnan())
        assert torch.equal(head.nan_to_num(), table["head"].nan_to_num())
    stats, head = digest([images])
    assert torch.allclose(stats[0], case["inputs_digest"]["x"]["stats"], rtol=1e-12, atol=0)
    assert torch.equal(head[0], case["inputs_digest"]["x"]["head"])


def reference_model(mapped, num_classes=16):
    model = IVReID.from_config(ivreid_cfg(), num_classes)
    model.load_state_dict(mapped)
    return model


def test_model_forward_eval(forward_case):
    case, _, images, mapped = forward_case
    model = reference_model(mapped).eval()
    neck = capture(model.head)
    hidden = {name: capture(getattr(model, name).fc1) for name in ("aux_visible", "aux_infrared")}
    with torch.no_grad():
        out = model(images, "infrared")
        pool, feat = neck[0]
        aux = {"rgb": model.aux_visible(feat), "ir": model.aux_infrared(feat)}
    expected = case["outputs_eval"]
    close(feat, expected["feat"], atol=1e-4)
    close(pool, expected["global_feat"], atol=1e-4)
    assert set(out) == {"bn", "pool"}
    close(out["bn"], F.normalize(expected["feat"], dim=1), atol=1e-6)
    close(out["pool"], F.normalize(expected["global_feat"], dim=1), atol=1e-6)
    for prefix, name in (("rgb", "aux_visible"), ("ir", "aux_infrared")):
        close(aux[prefix], case["aux_outputs_eval"][prefix + "_score"], atol=1e-4)
        close(hidden[name][0], case["aux_outputs_eval"][prefix + "_fc1"], atol=1e-4)


def test_model_forward_train(forward_case):
    # In float64: float32 train mode amplifies rounding through the 8-image BN statistics
    # (up to 4e-4 on feat), float64 reproduces the reference's float64 run to 1e-9.
    case, _, images, mapped = forward_case
    model = reference_model(mapped).double().train()
    with torch.no_grad():
        out = model(images.double())
    expected, aux = case["outputs_train_f64"], case["aux_outputs_train_f64"]
    for mine, theirs in ((out["feat"], expected["feat"]), (out["logits"], expected["cls_score"]),
                         (out["aux_logits_visible"], aux["rgb_score"]), (out["aux_logits_infrared"], aux["ir_score"])):
        assert mine.dtype == torch.float64
        close(mine, theirs, rtol=1e-9, atol=1e-10)
    # The remaining references are the float32 run's, 2e-5 / 2e-6 from float64 here.
    close(out["pool"], case["intermediates_train"]["gap"].double(), atol=1e-4)
    state = model.state_dict()
    buffers = dict(case["buffers_after_train"])
    buffers.update({"ide_net." + k: v for k, v in case["aux_buffers_after_train"].items()})
    assert len(buffers) == 3 * 56  # 53 backbone BNs, the BNNeck, two aux BNs
    for key, value in buffers.items():
        mine = state[project_key(key)]
        assert torch.allclose(mine.double(), value.double(), rtol=RTOL, atol=ATOL), key


# --- layout -------------------------------------------------------------------------------

def read_key_sections():
    """{section title: [(key, shape)]} of state_dict_keys.txt."""
    sections, current = {}, None
    for line in (GOLDEN / "state_dict_keys.txt").read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        elif line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            current.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()]))
    return sections


@pytest.mark.parametrize("dataset, num_classes, params, aux_params", [
    ("SYSU", 395, 24348043, 2511638), ("RegDB", 206, 23960782, 2317724)])
def test_state_dict_layout_matches_reference(dataset, num_classes, params, aux_params):
    sections = read_key_sections()
    base = next(rows for title, rows in sections.items() if title.startswith("Baseline, " + dataset))
    aux = next(rows for title, rows in sections.items() if title.startswith("IDENet"))
    with torch.device("meta"):
        model = IVReID.from_config(ivreid_cfg(), num_classes)
    own = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    # The IDENet section lists the SYSU heads; their fc2 has one row per identity.
    aux_shapes = [(k, [num_classes] + shape[1:] if "_fc2." in k else shape) for k, shape in aux]
    expected = [(project_key(k), s) for k, s in base] + [(project_key("ide_net." + k), s) for k, s in aux_shapes]
    assert own == expected
    counted = {"main": 0, "aux": 0}
    for name, p in model.named_parameters():
        counted["aux" if name.startswith(("aux_visible.", "aux_infrared.")) else "main"] += p.numel()
    assert counted == {"main": params, "aux": aux_params}


def test_conv_biases_and_their_init():
    torch.manual_seed(0)
    net = SingleStreamResNet("resnet50")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and sum(c.bias.numel() for c in convs) == 26560
    for conv in convs:
        bound = 1.0 / math.sqrt(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
        assert conv.bias.abs().max() <= bound
        # U(-b, b) over >= 64 values reaches past b / 2 and has std b / sqrt(3).
        assert conv.bias.abs().max() > bound / 2
        if conv.out_channels >= 512:
            assert conv.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    bare = SingleStreamResNet("resnet18", conv_bias=False)
    assert all(m.bias is None for m in bare.modules() if isinstance(m, nn.Conv2d))


def test_stem_relu_switch_and_last_stride():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 32)
    released = SingleStreamResNet("resnet18", stem_relu=False).eval()
    corrected = SingleStreamResNet("resnet18", stem_relu=True).eval()
    corrected.load_state_dict(released.state_dict())
    bn = released.bn1
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        corrected.bn1.running_mean.copy_(bn.running_mean)
        normed = F.batch_norm(F.conv2d(x, released.conv1.weight, released.conv1.bias, stride=2, padding=3),
                              bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        close(released.stem(x), F.max_pool2d(normed, 3, 2, 1), atol=1e-6)
        close(corrected.stem(x), F.max_pool2d(normed.clamp_min(0), 3, 2, 1), atol=1e-6)
        assert (released.stem(x) < 0).any()
        assert released(x).shape == (2, 512, 4, 2)
        assert SingleStreamResNet("resnet18", last_stride=2).eval()(x).shape == (2, 512, 2, 1)


# --- heads --------------------------------------------------------------------------------

def test_bnneck_head_defaults_unchanged():
    # The draws of the released CMFN head, in order: the classifier's construction, the BN
    # weight N(1, 0.01), the classifier weight N(0, 0.001).
    torch.manual_seed(3)
    nn.Linear(64, 10, bias=False)
    bn_weight = torch.empty(64).normal_(1.0, 0.01)
    cls_weight = torch.empty(10, 64).normal_(0.0, 0.001)
    torch.manual_seed(3)
    head = BNNeckHead(64, 10)
    assert torch.equal(head.bnneck.weight.detach(), bn_weight)
    assert torch.equal(head.classifier.weight.detach(), cls_weight)
    assert head.classifier.bias is None
    assert not head.bnneck.bias.requires_grad and not head.bnneck.bias.any()
    with pytest.raises(ValueError, match="classifier"):
        BNNeckHead(64, 10, classifier="xavier")


def test_ivreid_initialisation():
    torch.manual_seed(0)
    head = BNNeckHead(2048, 395, neck_init="default", neck_bias="trainable", classifier="kaiming")
    assert torch.equal(head.bnneck.weight.detach(), torch.ones(2048))
    assert head.bnneck.bias.requires_grad and not head.bnneck.bias.any()
    assert head.classifier.bias is not None and not head.classifier.bias.any()
    # kaiming-normal over fan_out: std sqrt(2 / C) = 0.0712 for C = 395.
    assert head.classifier.weight.std().item() == pytest.approx(0.0712, rel=0.02)
    assert abs(head.classifier.weight.mean().item()) < 1e-3
    aux = ModalityClassifier(2048, 512, 395)
    assert torch.equal(aux.bn.weight.detach(), torch.ones(2048)) and not aux.bn.bias.any()
    assert aux.fc1.weight.std().item() == pytest.approx(0.0625, rel=0.02)
    assert aux.fc2.weight.std().item() == pytest.approx(0.0712, rel=0.02)
    assert not aux.fc1.bias.any() and not aux.fc2.bias.any()


# --- contract -----------------------------------------------------------------------------

def test_registered_and_contract():
    assert MODELS.get("ivreid") is IVReID
    assert IVReID.embedding_weights() == [("bn", 1.0)]
    assert IVReID.embedding_weights("pool") == [("pool", 1.0)]
    torch.manual_seed(0)
    model = tiny_model(5)
    x = torch.randn(6, 3, 64, 32)
    out = model.train()(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert tuple(out) == IVReID.train_outputs
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"pool": (6, 512), "feat": (6, 512), "logits": (6, 5),
                      "aux_logits_visible": (6, 5), "aux_logits_infrared": (6, 5)}
    # feat is the train-mode BNNeck of pool (weight 1, bias 0 at init): zero mean per channel.
    close(out["feat"].mean(0), torch.zeros(512), atol=1e-5)
    assert out["aux_logits_visible"].requires_grad
    model.eval()
    with torch.no_grad():
        a, b = model(x, "visible"), model(x, torch.ones(6, dtype=torch.int64), torch.arange(6))
    assert set(a) == set(IVReID.embedding_sets)
    for name in IVReID.embedding_sets:
        assert torch.equal(a[name], b[name])
        close(a[name].norm(dim=1), torch.ones(6), atol=1e-6)


def test_param_groups():
    model = tiny_model(5)
    cfg = ivreid_cfg("SOLVER.BACKBONE_LR_FACTOR", "1.0", "MODEL.IVREID.AUX_LR_FACTOR", "10")
    groups = model.param_groups(cfg)
    assert [(g["name"], g["lr_factor"]) for g in groups] == [("main", 1.0), ("aux_heads", 10.0)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    named = dict(model.named_parameters())
    assert ids[1] == {id(p) for k, p in named.items() if k.startswith(("aux_visible.", "aux_infrared."))}
    assert ids[0] | ids[1] == {id(p) for p in named.values()} and not ids[0] & ids[1]
    assert id(model.head.bnneck.bias) in ids[0] and id(model.backbone.conv1.bias) in ids[0]
    with pytest.raises(ConfigError, match="MODEL.IVREID.AUX_LR_FACTOR"):
        model.param_groups(ivreid_cfg("MODEL.IVREID.AUX_LR_FACTOR", "-1"))


@pytest.mark.parametrize("key, value", [("MODEL.BACKBONE", "resnet34"), ("MODEL.LAST_STRIDE", "3"),
                                        ("MODEL.IVREID.AUX_DIM", "0")])
def test_bad_config_values(key, value):
    with pytest.raises(ConfigError, match=key):
        IVReID.from_config(ivreid_cfg("MODEL.BACKBONE", "resnet18", key, value), 5)


def test_imagenet_loading(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None).state_dict()
    # Like the old resnet50-19c8e357.pth: random values, no BN batch counters, fc included.
    state = {k: torch.randn(v.shape) for k, v in source.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    scratch = tiny_model(5)
    torch.manual_seed(0)
    loaded = tiny_model(5, "MODEL.PRETRAINED", "True", "MODEL.PRETRAIN_PATH", str(path))
    own = loaded.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    biases = [k for k in own if k.endswith(".bias") and ("conv" in k or "downsample.0" in k)]
    assert len(biases) == 20
    for key in biases:
        assert torch.equal(own[key], scratch.backbone.state_dict()[key]), key
    del state["layer4.1.bn2.running_var"]
    report = loaded.backbone.load_imagenet(state)
    assert report["unused"] == ["fc.bias", "fc.weight"]
    assert report["missing"] == ["layer4.1.bn2.running_var"]
    assert len(report["loaded"]) == len(state) - 2
