"""The FusionReID model: golden cases of the released code, the model contract and the VI variant.

Golden (tests/golden/fusionreid/, keyed weights regenerated once per module and checked
against the stored checksums, then mapped through the released-checkpoint converter):

* ``dmf.pt``: the fusion part at full size (two LRUs, GeM, two-layer HTM) in eval and train mode;
* ``full_model.pt``: the whole model at 256x128 (8 classes, 3 cameras, batch 4): the eval
  descriptor (neck before and after), the 12 training outputs, the six-head float32 loss, the
  BN buffers after one training forward and, in float64, the loss and every parameter gradient.

Small-model tests (ResNet-18, a 2-block width-48 ViT at 64x32) cover the contract: names and
shapes, the whole-vector normalisation of the default descriptor and its distance, a batch of
one in eval, camera ids, parameter groups, the twelve zero-gradient tensors, and the
FusionReID-VI options.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from evaluation.embeddings import distance_from_features, embedding_weights
from fusionreid_golden import GOLDEN, capture, load_golden
from keyed_weights import regenerate, verify
from loss.fusionreid import FusionReIDCriterion
from loss.cross_entropy import identity_loss
from loss.triplet import triplet_loss
from model.fusionreid import convert
from model.fusionreid.convert import convert_state_dict
from model.fusionreid.fusionreid import HEADS, VI_LABEL, DualAttentionMutualFusion, FusionReID, FusionReIDVI
from utils.compat import torchvision  # noqa: F401
import torchvision.models
from utils.config import build_config
from utils.errors import ConfigError

EVAL_TOL = dict(rtol=1e-5, atol=1e-5)
FULL_EVAL_TOL = dict(rtol=1e-5, atol=2e-5)
TRAIN_TOL = dict(rtol=1e-4, atol=1e-4)
# released output names per head: (logits, pre-BN feature)
RELEASED_OUTPUTS = dict(zip(HEADS, [("cls_score_r", "global_feat_r"), ("cls_score_f", "global_feat_f")]
                            + [("cls_score_%d" % k, "global_feat_%d" % k) for k in range(1, 5)]))

# The MODEL.FUSIONREID defaults: the released values (the VI_* keys: the extension's defaults).
RELEASED_KEYS = {
    "NUM_CAMERAS": 0, "SIE_CAMERA": True, "SIE_COE": 3.0, "PATCH_SIZE": 16, "STRIDE_SIZE": 12,
    "VIT_EMBED_DIM": 768, "VIT_DEPTH": 12, "VIT_NUM_HEADS": 12, "DROP_PATH": 0.1, "VIT_PRETRAIN_PATH": "",
    "STANDARD_STEM": False, "MIX_DIM": 768, "HTM_LAYER": 2, "HTM_NUM_HEADS": 12,
    "VI_SIE": "camera", "VI_CNN_STEM": "shared", "VI_VIT_STEM": "shared", "VI_CAMERA_BASE": 1,
}
# ResNet-18, a 2-block ViT of width 48 (4 heads) at 64x32 (5 x 2 grid), fusion width 48 with 12
# heads of 4, two HTM layers, three cameras.
SMALL = {
    "MODEL.BACKBONE": "resnet18", "INPUT.SIZE_TRAIN": [64, 32], "INPUT.SIZE_TEST": [64, 32],
    "MODEL.FUSIONREID.VIT_EMBED_DIM": 48, "MODEL.FUSIONREID.VIT_DEPTH": 2, "MODEL.FUSIONREID.VIT_NUM_HEADS": 4,
    "MODEL.FUSIONREID.MIX_DIM": 48, "MODEL.FUSIONREID.NUM_CAMERAS": 3,
}
FULL = {"INPUT.SIZE_TRAIN": [256, 128], "INPUT.SIZE_TEST": [256, 128], "MODEL.FUSIONREID.DROP_PATH": 0.0}


def fusionreid_cfg(name="fusionreid", small=True, **opts):
    """Defaults with MODEL.NAME `name`, no ImageNet weights, the SMALL sizes when `small`, then
    `opts` ({"MODEL.FUSIONREID.NUM_CAMERAS": 3, ...})."""
    cfg = build_config(freeze=False, validate=False)
    cfg.MODEL.NAME = name
    cfg.MODEL.PRETRAINED = False
    for key, value in dict(SMALL if small else FULL, **opts).items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def test_config_defaults_are_the_released_values():
    assert dict(build_config(validate=False).MODEL.FUSIONREID) == RELEASED_KEYS


def criterion():
    cfg = build_config(opts=["LOSS.NAME", "fusionreid", "LOSS.LABEL_SMOOTH", "0.1"], validate=False)
    return FusionReIDCriterion(cfg)


def assert_probe(tensor, probe, tol):
    flat = tensor.contiguous().view(-1)
    assert list(tensor.shape) == probe["shape"]
    torch.testing.assert_close(flat[probe["idx"]], probe["val"], **tol)


def assign(model, state, dtype=None):
    """Load `state` into a model built on the meta device (no initialisation cost)."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def small_model(name="fusionreid", num_classes=4, seed=0, **opts):
    torch.manual_seed(seed)
    cls = FusionReIDVI if name == "fusionreid_vi" else FusionReID
    return cls.from_config(fusionreid_cfg(name, **opts), num_classes)


@pytest.fixture(scope="module")
def small():
    """The default small model in eval mode (tests that train it work on a copy)."""
    return small_model().eval()


def small_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 32, generator=g), torch.arange(n) % 3


# ------------------------------------------------------------------------------------------
# golden: the fusion part at full size

def test_dmf_matches_released_at_full_size():
    case = load_golden("dmf.pt")
    released = regenerate(case["weights"])
    assert not verify(released, case["weights"])
    state = {convert.dmf_key(k): v for k, v in released.items()}
    assert None not in state
    inter = {"gap_r": "pool_cnn", "gap_f": "pool_vit", "res_LRU": "lru_cnn", "former_LRU": "lru_vit"}
    for i in range(2):
        inter.update({"HTM.blocks.%d.MUF_RES" % i: "htm.layers.%d.fuse_cnn" % i,
                      "HTM.blocks.%d.MFU_FORMER" % i: "htm.layers.%d.fuse_vit" % i,
                      "HTM.blocks.%d.SEU1" % i: "htm.layers.%d.encode_cnn" % i,
                      "HTM.blocks.%d.SEU2" % i: "htm.layers.%d.encode_vit" % i})
    inputs = case["inputs"]
    for mode, tol in (("eval", EVAL_TOL), ("train", TRAIN_TOL)):
        with torch.device("meta"):
            dmf = DualAttentionMutualFusion(2048, 768, 768, depth=2, num_heads=12)
        assign(dmf, state).train(mode == "train")
        seen = capture(dmf, inter.values())
        with torch.no_grad():
            outs = dmf(inputs["mid_fea_r"], inputs["mid_fea_f"], (21, 10))
        for name, out in zip(case["output_names"], outs):
            torch.testing.assert_close(out, case["outputs_" + mode][name], **tol)
        for ref, mine in inter.items():
            if ref in case["intermediates_" + mode]:
                want = case["intermediates_" + mode][ref]
                torch.testing.assert_close(seen[mine].reshape(want.shape), want, **tol)
            else:
                assert_probe(seen[mine], case["probes_" + mode][ref], tol)
        if mode == "train":
            buffers = dict(dmf.named_buffers())
            for ref, want in case["buffers_after_train"].items():
                torch.testing.assert_close(buffers[convert.dmf_key(ref)], want, **TRAIN_TOL)


# ------------------------------------------------------------------------------------------
# golden: the whole model at 256x128

@pytest.fixture(scope="module")
def full_case():
    return load_golden("full_model.pt")


@pytest.fixture(scope="module")
def full_state(full_case):
    """The case's keyed weights (checksums checked), converted from the released layout."""
    released = regenerate(full_case["weights"])
    assert not verify(released, full_case["weights"])
    state, report = convert_state_dict(released)
    assert report["unmapped"] == []
    assert report["dropped"] == ["transformer.base.fc.weight", "transformer.base.fc.bias"]
    return state


def full_model(state, dtype=None):
    with torch.device("meta"):
        model = FusionReID.from_config(fusionreid_cfg(small=False, **{"MODEL.FUSIONREID.NUM_CAMERAS": 3}), 8)
    return assign(model, state, dtype)


def test_full_model_eval_descriptors_match_released(full_case, full_state):
    model = full_model(full_state).eval()
    x, cams = full_case["inputs"]["x"], full_case["inputs"]["cam_label"]
    inter = {"resnet.gap": "cnn_pool", "gap_r": "dmf.pool_cnn", "gap_f": "dmf.pool_vit",
             "resnet.bottleneck": "heads.cnn.bnneck", "transformer.bottleneck": "heads.vit.bnneck"}
    for i in range(2):
        inter["HTM.blocks.%d.MUF_RES" % i] = "dmf.htm.layers.%d.fuse_cnn" % i
        inter["HTM.blocks.%d.MFU_FORMER" % i] = "dmf.htm.layers.%d.fuse_vit" % i
    for k, h in enumerate(HEADS[2:], 1):
        inter["bottleneck_%d" % k] = "heads.%s.bnneck" % h
    probes = {"resnet.base": "cnn", "transformer.base": "vit", "res_LRU": "dmf.lru_cnn", "former_LRU": "dmf.lru_vit"}
    seen = capture(model, list(inter.values()) + list(probes.values()))
    with torch.no_grad():
        out = model(x, "visible", cams)
    assert list(out) == list(FusionReID.embedding_sets)
    before, after = full_case["outputs_eval"]["feat"], full_case["outputs_eval_neck_after"]["feat"]
    assert before.shape == (4, 5888)
    # the default descriptor is the concatenation normalised as a whole
    for name, ref in (("concat6", before), ("concat6_bn", after)):
        norm = ref.norm(dim=1, keepdim=True)
        torch.testing.assert_close(out[name] * norm, ref, **FULL_EVAL_TOL)
    for h, (start, stop) in zip(HEADS, full_case["feat_slices"].values()):
        for name, ref in ((h, before[:, start:stop]), (h + "_bn", after[:, start:stop])):
            torch.testing.assert_close(out[name] * ref.norm(dim=1, keepdim=True), ref, **FULL_EVAL_TOL)
    for ref, mine in inter.items():
        want = full_case["intermediates_eval"][ref]
        torch.testing.assert_close(seen[mine].reshape(want.shape), want, **FULL_EVAL_TOL)
    for ref, mine in probes.items():
        assert_probe(seen[mine], full_case["probes_eval"][ref], FULL_EVAL_TOL)


def test_full_model_training_outputs_loss_and_buffers_match_released(full_case, full_state):
    model = full_model(full_state).train()
    inputs = full_case["inputs"]
    with torch.no_grad():
        out = model(inputs["x"], "visible", inputs["cam_label"])
    assert list(out) == list(FusionReID.train_outputs)
    for h, (logits, feat) in RELEASED_OUTPUTS.items():
        torch.testing.assert_close(out["logits_" + h], full_case["outputs_train"][logits], **TRAIN_TOL)
        torch.testing.assert_close(out["feat_" + h], full_case["outputs_train"][feat], **TRAIN_TOL)
    want = full_case["train_loss"]
    total, terms, _ = criterion()(out, {"pids": inputs["label"]}, 0)
    assert float(total) == pytest.approx(float(want["total"]), rel=1e-6)
    for k, h in enumerate(HEADS, 1):
        labels = inputs["label"]
        head = identity_loss(out["logits_" + h], labels, 0.1) + triplet_loss(out["feat_" + h], labels, None)
        # 3e-5: the largest float32 loss difference measured between thread counts
        assert float(head) == pytest.approx(float(want["loss_%d" % k]), abs=3e-5)
    buffers = dict(model.named_buffers())
    assert len(full_case["buffers_after_train"]) == 189
    for ref, value in full_case["buffers_after_train"].items():
        torch.testing.assert_close(buffers[convert.model_key(ref)], value, **TRAIN_TOL)


@pytest.mark.slow
def test_full_model_float64_loss_and_gradients_match_released(full_case, full_state):
    model = full_model(full_state, torch.float64).train()
    inputs = full_case["inputs"]
    out = model(inputs["x"].double(), "visible", inputs["cam_label"])
    total, _, _ = criterion()(out, {"pids": inputs["label"]}, 0)
    assert float(total.detach()) == pytest.approx(float(full_case["train_loss_f64"]["total"]), rel=1e-12)
    total.backward()
    params = dict(model.named_parameters())
    zero = set(full_case["grads_f32_vs_f64"]["structurally_zero"])
    assert len(zero) == 12
    for ref, want in full_case["grads_f64"].items():
        if ref in zero:
            continue
        grad = params[convert.model_key(ref)].grad
        assert (grad - want).abs().max() <= 1e-9 * want.abs().max(), ref
    checked = 0
    for ref, want in full_case["grad_checksums_f64"].items():
        grad = params[convert.model_key(ref)].grad
        if ref in zero:
            assert grad.abs().max() < 1e-10, ref
            continue
        scale = want["max_abs"]
        assert abs(float(grad.sum()) - want["sum"]) <= 1e-9 * want["abs_sum"], ref
        assert float(grad.abs().sum()) == pytest.approx(want["abs_sum"], rel=1e-9), ref
        assert float(grad.abs().max()) == pytest.approx(scale, rel=1e-9), ref
        checked += 1
    assert checked == 457 - 12
    # the released fc is not built; the six frozen BNNeck biases get no gradient
    no_grad = full_case["no_grad_params"]
    assert [k for k in no_grad if convert.model_key(k) is None] == ["transformer.base.fc.weight",
                                                                    "transformer.base.fc.bias"]
    for ref in no_grad:
        mapped = convert.model_key(ref)
        if mapped is not None:
            assert not params[mapped].requires_grad and params[mapped].grad is None


# ------------------------------------------------------------------------------------------
# contract, on a small model

def test_small_model_train_and_eval_outputs(small):
    model = copy.deepcopy(small)
    x, cams = small_batch()
    model.train()
    out = model(x, "visible", cams)
    assert list(out) == list(FusionReID.train_outputs)
    dims = {"cnn": 512, "vit": 48, "lru_cnn": 48, "lru_vit": 48, "htm_cnn": 48, "htm_vit": 48}
    for h in HEADS:
        assert out["feat_" + h].shape == (4, dims[h]) and out["logits_" + h].shape == (4, 4)
    model.eval()
    with torch.no_grad():
        sets = model(x, "visible", cams)
        feats = model.features(x, "visible", cams)
    assert list(sets) == list(FusionReID.embedding_sets)
    assert sets["concat6"].shape == (4, 512 + 5 * 48)
    for f in sets.values():
        torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    whole = torch.cat([feats[h] for h in HEADS], dim=1)
    torch.testing.assert_close(sets["concat6"], whole / whole.norm(dim=1, keepdim=True))
    bns = torch.cat([model.heads[h].bnneck(feats[h]) for h in HEADS], dim=1)
    torch.testing.assert_close(sets["concat6_bn"], bns / bns.norm(dim=1, keepdim=True))
    for h in HEADS:
        torch.testing.assert_close(sets[h], feats[h] / feats[h].norm(dim=1, keepdim=True))


def test_default_descriptor_distance_is_the_released_one(small):
    """The released evaluator: the 5,888-d concat L2-normalised whole, squared Euclidean distance."""
    model = small
    x, cams = small_batch(6)
    with torch.no_grad():
        sets = model(x, "visible", cams)
        feats = model.features(x, "visible", cams)
    weights = embedding_weights(model, "")
    assert weights == [("concat6", 1.0)]
    whole = F.normalize(torch.cat([feats[h] for h in HEADS], dim=1), dim=1).double()
    q, g = whole[:2], whole[2:]
    released = (q * q).sum(1, keepdim=True) + (g * g).sum(1) - 2 * q @ g.t()
    qs = {k: v[:2] for k, v in sets.items()}
    gs = {k: v[2:] for k, v in sets.items()}
    mine = distance_from_features(qs, gs, weights, "sqeuclidean", dtype=torch.float64)
    torch.testing.assert_close(mine, released, rtol=1e-6, atol=1e-7)
    # per-part normalisation is a different weighting, hence a different distance
    parts = distance_from_features(qs, gs, embedding_weights(model, "parts6"), "sqeuclidean", dtype=torch.float64)
    assert not torch.allclose(parts, released, atol=1e-3)


def test_a_batch_of_one_evaluates_like_its_row_in_a_batch(small):
    model = small
    x, cams = small_batch(3)
    with torch.no_grad():
        batch = model(x, "visible", cams)
        one = model(x[1:2], "visible", cams[1:2])
    for name in FusionReID.embedding_sets:
        assert one[name].shape == (1, batch[name].shape[1])
        torch.testing.assert_close(one[name], batch[name][1:2], rtol=1e-5, atol=1e-6)


def test_camera_ids_drive_the_camera_embedding(small):
    model = small
    x, cams = small_batch(2)
    assert model.vit.sie_embed.shape == (3, 1, 48) and model.vit.sie_coe == 3.0
    with torch.no_grad():
        a = model(x, "visible", torch.tensor([0, 0]))["concat6"]
        b = model(x, "visible", torch.tensor([0, 2]))["concat6"]
        with pytest.raises(ValueError, match="pass camids"):
            model(x, "visible")
        with pytest.raises(ValueError, match="camera ids"):
            model(x, "visible", torch.tensor([0, 3]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    # one camera (or SIE off) builds no table, as released; then no camera ids are needed
    for opts in ({"MODEL.FUSIONREID.NUM_CAMERAS": 1}, {"MODEL.FUSIONREID.SIE_CAMERA": False}):
        plain = small_model(**opts).eval()
        assert plain.vit.sie_embed is None
        with torch.no_grad():
            assert plain(x, "visible")["concat6"].shape == (2, 752)


def test_select_embeddings_limits_the_eval_sets(small):
    model = copy.deepcopy(small)
    x, cams = small_batch(2)
    model.select_embeddings(["htm_vit", "concat6"])
    with torch.no_grad():
        assert list(model(x, "visible", cams)) == ["concat6", "htm_vit"]
    model.select_embeddings(None)
    with torch.no_grad():
        assert list(model(x, "visible", cams)) == list(FusionReID.embedding_sets)
    with pytest.raises(ValueError, match="unknown FusionReID embedding"):
        model.select_embeddings(["sum6"])


def test_presets_name_every_single_feature_and_both_necks():
    presets = FusionReID.embedding_presets
    assert FusionReID.default_embedding == "concat6"
    for h in HEADS:
        assert presets[h] == {h: 1.0} and presets[h + "_bn"] == {h + "_bn": 1.0}
    assert presets["concat6_bn"] == {"concat6_bn": 1.0}
    assert presets["parts6"] == {h: 1.0 for h in HEADS}


def test_param_groups_follow_the_released_optimizer():
    """Against the lr/wd column of the released state-dict listing (Market: 751 classes, 6 cams)."""
    with torch.device("meta"):
        model = FusionReID.from_config(fusionreid_cfg(small=False, **{"MODEL.FUSIONREID.NUM_CAMERAS": 6}), 751)
    cfg = fusionreid_cfg(**{"SOLVER.BIAS_LR_FACTOR": 2.0, "SOLVER.WEIGHT_DECAY_BIAS": 1e-4,
                            "SOLVER.WEIGHT_DECAY": 1e-4})
    groups = {g["name"]: g for g in model.param_groups(cfg)}
    assert groups["biases"]["lr_factor"] == 2.0 and groups["biases"]["weight_decay"] == 1e-4
    assert groups["weights"]["lr_factor"] == 1.0
    member = {id(p): name for name, g in groups.items() for p in g["params"]}
    assert len(member) == sum(len(g["params"]) for g in groups.values())
    params = dict(model.named_parameters())
    listed = 0
    with open(os.path.join(GOLDEN, "state_dict_keys.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, _, status, lrwd = line.split()[:5]
            mapped = convert.model_key(key)
            if status == "unused":
                assert mapped is None, key
                continue
            assert mapped is not None, key
            if status == "buffer":
                continue
            param = params[mapped]
            assert list(param.shape) == ([] if shape == "scalar" else [int(s) for s in shape.split("x")]), key
            if status == "frozen":
                assert id(param) not in member and not param.requires_grad, key
            else:
                assert member[id(param)] == ("biases" if lrwd.startswith("0.01/") else "weights"), key
            listed += 1
    assert listed == len(params) == 463  # 457 trainable + the six frozen BNNeck biases
    assert sum(p.numel() for p in params.values()) == 173_400_111 - 769_000


def test_exactly_zero_gradients_are_the_released_twelve(small):
    """float64 training step of a small model: the tensors the released model leaves with a zero
    loss gradient (shift-invariant paths) are the same here, and only those. ResNet-18's first
    stage has identity shortcuts, so there (unlike ResNet-50, whose layer1 starts with a conv +
    BN shortcut) the stem BN's shift reaches a ReLU and ``cnn.bn1.bias`` does get a gradient."""
    model = copy.deepcopy(small).double().train()
    x, _ = small_batch(6)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    out = model(x.double(), "visible", torch.tensor([0, 1, 2, 0, 1, 2]))
    total, _, _ = criterion()(out, {"pids": pids}, 0)
    total.backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    zero = {n for n, p in model.named_parameters() if p.requires_grad and float(p.grad.abs().max()) <= 1e-12 * scale}
    released = load_golden("full_model.pt")["grads_f32_vs_f64"]["structurally_zero"]
    assert len(released) == 12
    assert zero == {convert.model_key(k) for k in released} - {"cnn.bn1.bias"}


# ------------------------------------------------------------------------------------------
# construction

def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="INPUT.SIZE_TEST"):
        FusionReID.from_config(fusionreid_cfg(**{"INPUT.SIZE_TEST": [128, 64]}), 4)
    with pytest.raises(ConfigError, match="MIX_DIM 40 is not a multiple of MODEL.FUSIONREID.HTM_NUM_HEADS"):
        FusionReID.from_config(fusionreid_cfg(**{"MODEL.FUSIONREID.MIX_DIM": 40}), 4)
    with pytest.raises(ConfigError, match="HTM_LAYER"):
        FusionReID.from_config(fusionreid_cfg(**{"MODEL.FUSIONREID.HTM_LAYER": 0}), 4)
    with pytest.raises(ConfigError, match="fusionreid_vi"):
        FusionReID.from_config(fusionreid_cfg(**{"MODEL.FUSIONREID.VI_SIE": "modality"}), 4)


def _fake_imagenet(tmp_path, vit_dim=48, depth=2):
    """A torchvision ResNet-18 file and a timm-layout ViT file (14 x 14 position grid)."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    vit = {"cls_token": torch.randn(1, 1, vit_dim), "pos_embed": torch.randn(1, 197, vit_dim),
           "patch_embed.proj.weight": torch.randn(vit_dim, 3, 16, 16), "patch_embed.proj.bias": torch.randn(vit_dim),
           "norm.weight": torch.randn(vit_dim), "norm.bias": torch.randn(vit_dim),
           "head.weight": torch.randn(1000, vit_dim), "head.bias": torch.randn(1000)}
    for i in range(depth):
        for name, shape in (("norm1.weight", (vit_dim,)), ("norm1.bias", (vit_dim,)),
                            ("attn.qkv.weight", (3 * vit_dim, vit_dim)), ("attn.qkv.bias", (3 * vit_dim,)),
                            ("attn.proj.weight", (vit_dim, vit_dim)), ("attn.proj.bias", (vit_dim,)),
                            ("norm2.weight", (vit_dim,)), ("norm2.bias", (vit_dim,)),
                            ("mlp.fc1.weight", (4 * vit_dim, vit_dim)), ("mlp.fc1.bias", (4 * vit_dim,)),
                            ("mlp.fc2.weight", (vit_dim, 4 * vit_dim)), ("mlp.fc2.bias", (vit_dim,))):
            vit["blocks.%d.%s" % (i, name)] = torch.randn(shape)
    paths = str(tmp_path / "resnet18-5c106cde.pth"), str(tmp_path / "vit.pth")
    torch.save(resnet, paths[0])
    torch.save({"model": vit}, paths[1])
    return resnet, vit, paths


def test_imagenet_weights_start_both_branches(tmp_path):
    resnet, vit, (rpath, vpath) = _fake_imagenet(tmp_path)
    opts = {"MODEL.PRETRAINED": True, "MODEL.PRETRAIN_PATH": rpath, "MODEL.FUSIONREID.VIT_PRETRAIN_PATH": vpath,
            "MODEL.FUSIONREID.VI_CNN_STEM": "modality", "MODEL.FUSIONREID.VI_VIT_STEM": "modality"}
    model = FusionReIDVI.from_config(fusionreid_cfg("fusionreid_vi", **opts), 4)
    assert torch.equal(model.cnn.layer3[1].conv2.weight, resnet["layer3.1.conv2.weight"])
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, vit["blocks.1.mlp.fc2.weight"])
    assert model.vit.pos_embed.shape == (1, 11, 48)
    torch.testing.assert_close(model.vit.pos_embed[0, 0], vit["pos_embed"][0, 0])
    # the infrared stems start as copies of the ImageNet stems
    assert torch.equal(model.infrared_cnn_stem.conv1.weight, resnet["conv1.weight"])
    assert torch.equal(model.infrared_patch_embed.proj.weight, vit["patch_embed.proj.weight"])
    assert model.infrared_cnn_stem.conv1.weight.data_ptr() != model.cnn.conv1.weight.data_ptr()


# ------------------------------------------------------------------------------------------
# FusionReID-VI (project extension)

def test_vi_variant_is_labelled_as_a_project_extension():
    assert VI_LABEL == "FusionReID-VI (project extension)"
    assert FusionReIDVI.method_label == VI_LABEL and "project extension" in FusionReIDVI.__doc__
    assert FusionReID.method_label == "FusionReID"


def test_vi_side_information_by_camera_modality_or_both(small):
    x, cams = small_batch(2)
    # camera SIE with the same weights is FusionReID's, cameras counted from 1
    camera = small_model("fusionreid_vi").eval()
    with torch.no_grad():
        torch.testing.assert_close(camera(x, "infrared", cams + 1)["concat6"], small(x, "visible", cams)["concat6"])
    models = {sie: small_model("fusionreid_vi", **{"MODEL.FUSIONREID.VI_SIE": sie}).eval()
              for sie in ("modality", "camera_modality")}
    assert models["modality"].vit.sie_embed.shape[0] == 2
    assert models["camera_modality"].vit.sie_embed.shape[0] == 6  # 3 cameras x 2 modalities
    model = models["modality"]
    with torch.no_grad():
        vis = model(x, "visible")["concat6"]
        ir = model(x, "infrared")["concat6"]
        mixed = model(x, torch.tensor([0, 1]))["concat6"]
        by_cam = model(x, "visible", torch.tensor([2, 0]))["concat6"]
    assert not torch.allclose(vis, ir, atol=1e-4)
    torch.testing.assert_close(mixed, torch.stack([vis[0], ir[1]]))
    torch.testing.assert_close(by_cam, vis)  # the camera does not matter in modality mode
    model = models["camera_modality"]
    with torch.no_grad():
        # cameras are numbered from 1 (VI_CAMERA_BASE); entry (camera - 1) * 2 + modality
        a = model(x, torch.tensor([1, 0]), torch.tensor([1, 2]))["concat6"]  # rows 1 and 2 of the table
        b = model(x, torch.tensor([0, 1]), torch.tensor([1, 2]))["concat6"]  # rows 0 and 3
        with pytest.raises(ValueError, match="pass camids"):
            model(x, "visible")
    sie = model.vit.sie_embed
    assert not torch.allclose(a, b)
    # entry camera * 2 + modality: swapping rows 1 <-> 2 of the table swaps the two images' results
    with torch.no_grad():
        sie[[1, 2]] = sie[[2, 1]].clone()
        swapped = model(x, torch.tensor([0, 0]), torch.tensor([2, 1]))["concat6"]
    torch.testing.assert_close(swapped[0], a[0])
    with pytest.raises(ValueError, match="camera ids must lie in 1..3"):
        model(x, "visible", torch.tensor([0, 1]))


def test_vi_modality_stems_start_equal_and_route_each_modality():
    x, cams = small_batch(4)
    cams = cams + 1  # the visible-infrared datasets number cameras from 1
    modality = torch.tensor([0, 1, 1, 0])
    shared = small_model("fusionreid_vi", seed=3).eval()
    split = small_model("fusionreid_vi", seed=3, **{"MODEL.FUSIONREID.VI_CNN_STEM": "modality",
                                                     "MODEL.FUSIONREID.VI_VIT_STEM": "modality"}).eval()
    assert set(split.state_dict()) - set(shared.state_dict()) == {
        "infrared_cnn_stem.conv1.weight", "infrared_cnn_stem.bn1.weight", "infrared_cnn_stem.bn1.bias",
        "infrared_cnn_stem.bn1.running_mean", "infrared_cnn_stem.bn1.running_var",
        "infrared_cnn_stem.bn1.num_batches_tracked", "infrared_patch_embed.proj.weight",
        "infrared_patch_embed.proj.bias"}
    with torch.no_grad():
        want = shared(x, modality, cams)
        got = split(x, modality, cams)
        for name in want:
            torch.testing.assert_close(got[name], want[name])
        split.infrared_cnn_stem.conv1.weight.mul_(-1)
        split.infrared_patch_embed.proj.weight.mul_(-1)
        changed = split(x, modality, cams)["concat6"]
    torch.testing.assert_close(changed[[0, 3]], want["concat6"][[0, 3]])
    assert not torch.allclose(changed[[1, 2]], want["concat6"][[1, 2]], atol=1e-4)
    # training: the infrared stem's BN normalises over the infrared rows only
    split.train()
    split(x, modality, cams)
    ir_stem = split.infrared_cnn_stem
    with torch.no_grad():
        conv = ir_stem.conv1(x[[1, 2]])
    expected = 0.1 * conv.mean(dim=(0, 2, 3)) + 0.9 * torch.zeros(conv.shape[1])
    torch.testing.assert_close(ir_stem.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="modality"):
        split(x, None, cams)
