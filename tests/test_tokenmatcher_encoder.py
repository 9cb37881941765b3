"""The TokenMatcher / CMAG encoder against the released code's golden cases (tests/golden/cmag/).

* ``encoder_k6_depth2.pt`` (K=6, depth 2) and ``encoder_k4_full.pt`` (the full SYSU encoder,
  marked slow): weights regenerated from the README's recipe in the reference layout,
  converted to this project's keys, loaded strictly; eval features of both stems, mirrored,
  flip-averaged and L2-normalised, the intermediates (stem tokens, last shared block, the
  copied block + norm, per-token BNs), and a train-mode forward on [RGB; IR] rows (features,
  raw tokens, the BN running statistics afterwards);
* ``encoder_load_param.pt``: loading a TransReID-SSL-layout file (counts, the class token
  broadcast to all K, the stem into both stems, the last block and norm, the resized position
  grid with fresh class positions) and the golden ``resize_pos_embed`` outputs at C=48;
* behaviour on a tiny encoder: per-row modality routing, stem BatchNorms seeing only their
  modality, ghost batches against a loop over the chunks, flip averaging, parameter groups,
  stochastic-depth rates, from_config and its errors.
"""
import argparse
import copy
import math
import os
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from model.base import INFRARED, VISIBLE
from model.pretrained import PretrainedWeightsError
from model.tokenmatcher.convert import convert_state_dict, project_key
from model.tokenmatcher.encoder import TokenMatcherEncoder, flip_average
from model.tokenmatcher.pretrained import load_pretrained, resize_pos_embed
from model.registry import MODELS
from utils.config import build_config
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "cmag")
EVAL_TOL = dict(rtol=1e-4, atol=1e-4)
TRAIN_ATOL = 5e-4
# The keys this encoder reads under MODEL.TOKENMATCHER, with the reference's values.
TOKENMATCHER_DEFAULTS = dict(NUM_TOKENS=4, EMBED_DIM=768, DEPTH=12, NUM_HEADS=12, MLP_RATIO=4.0, STEM_WIDTH=64,
                             PATCH_SIZE=16, DROP_PATH=0.3, GHOST_BATCHES=4, PRETRAIN_HW_RATIO=2)


def golden(name):
    return torch.load(os.path.join(GOLDEN, name), weights_only=True)


def recipe_value(index, key, shape, seed):
    """The README's weight recipe for the tensor at `index` of the reference state-dict order."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed + index), dtype=torch.float32)
    if key.endswith("running_var"):
        return 1 + 0.25 * z.clamp(-2, 2)
    if key.endswith("running_mean"):
        return 0.1 * z
    if key in ("cls_token", "pos_embed"):
        return 0.2 * z
    if len(shape) >= 2:
        return z * (1 / math.sqrt(float(np.prod(shape[1:]))))
    if key.endswith(".bias"):
        return 0.05 * z
    return 1 + 0.25 * z.clamp(-2, 2)


def recipe_state(case):
    """The reference-layout state dict of a golden encoder case, in its ``keys_in_order``."""
    seed = case["params"]["recipe_seed"]
    return OrderedDict((key, recipe_value(i, key, shape, seed))
                       for i, (key, shape, _) in enumerate(case["weights"]["keys_in_order"]))


def encoder_from_reference(reference_state):
    """A reference-size encoder holding `reference_state` (converted), built without an init pass."""
    state, info = convert_state_dict(reference_state)
    with torch.device("meta"):
        model = TokenMatcherEncoder(num_tokens=info["num_tokens"], depth=info["depth"], embed_dim=info["embed_dim"])
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class GoldenEncoder:
    """A golden case, its regenerated weights and the encoder built from them."""

    def __init__(self, name):
        self.case = golden(name)
        self.reference = recipe_state(self.case)
        self.model = encoder_from_reference(self.reference)
        self.k = self.case["params"]["K"]


@pytest.fixture(scope="module")
def k6():
    return GoldenEncoder("encoder_k6_depth2.pt")


@pytest.fixture(scope="module")
def k4():
    return GoldenEncoder("encoder_k4_full.pt")


def checksum_mismatches(reference, checksums):
    bad = []
    for key, (total, abs_total, first) in checksums.items():
        values = reference[key].double().numpy().reshape(-1)
        if (np.sum(values), np.sum(np.abs(values)), values[0]) != (total, abs_total, first):
            bad.append(key)
    return bad


def eval_outputs(enc):
    """One eval pass over [x visible, x infrared, flip(x) visible, flip(x) infrared] with hooks."""
    model, x, k = enc.model, enc.case["inputs"]["x"], enc.k
    hooks, seen = [], {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, output.detach())

    hooks.append(model.stems["visible"].register_forward_hook(keep("visible_module")))
    hooks.append(model.stems["infrared"].register_forward_hook(keep("thermal_module")))
    hooks.append(model.blocks[-1].register_forward_hook(keep("last_shared")))
    hooks.append(model.last_norm.register_forward_hook(keep("b1")))
    hooks += [bn.register_forward_hook(keep("bottlenecks.%d" % i)) for i, bn in enumerate(model.token_bns)]
    images = torch.cat([x, x, x.flip(3), x.flip(3)])
    modality = torch.tensor([VISIBLE] * 2 + [INFRARED] * 2 + [VISIBLE] * 2 + [INFRARED] * 2)
    try:
        with torch.no_grad():
            feat = model.embed(images, modality)
            normalised = model(images, modality)["feat"]
    finally:
        for h in hooks:
            h.remove()
    return feat, normalised, seen


def check_eval(enc):
    case, k = enc.case, enc.k
    feat, normalised, seen = eval_outputs(enc)
    depth = case["params"]["depth"]
    # the stem hooks saw [x; flip(x)] of their own modality; the other hooks all 8 rows
    rows = {"modal1": slice(0, 2), "modal2": slice(2, 4)}
    stems = {"modal1": "visible_module", "modal2": "thermal_module"}
    for modal, sl in rows.items():
        inter = {key.split("/", 1)[1]: v for key, v in case["intermediates_eval"].items() if key.startswith(modal)}
        torch.testing.assert_close(seen[stems[modal]][:2, :8], inter[stems[modal]], **EVAL_TOL)
        torch.testing.assert_close(seen["last_shared"][sl, :k + 2], inter["blocks.%d" % (depth - 2)], **EVAL_TOL)
        torch.testing.assert_close(seen["b1"][sl, :k], inter["b1"], **EVAL_TOL)
        for i in range(k):
            torch.testing.assert_close(seen["bottlenecks.%d" % i][sl], inter["bottlenecks.%d" % i], **EVAL_TOL)
    out = case["outputs_eval"]
    for modal, sl in rows.items():
        flipped = slice(sl.start + 4, sl.stop + 4)
        torch.testing.assert_close(feat[sl], out[modal], **EVAL_TOL)
        torch.testing.assert_close(feat[flipped], out[modal + "_flip"], **EVAL_TOL)
        torch.testing.assert_close((feat[sl] + feat[flipped]) / 2, out[modal + "_extract_features"], **EVAL_TOL)
        torch.testing.assert_close(F.normalize((feat[sl] + feat[flipped]) / 2, dim=1),
                                   out[modal + "_extract_features_l2"], **EVAL_TOL)
        torch.testing.assert_close(normalised[sl], F.normalize(out[modal], dim=1), **EVAL_TOL)


def check_train(enc, order):
    """Train-mode forward (DropPath off) on the golden [RGB x; IR flip(x)] rows put in `order`."""
    case, model, k = enc.case, enc.model, enc.k
    x = case["inputs"]["x"]
    images = torch.cat([x, x.flip(3)])[order]
    modality = torch.tensor([VISIBLE, VISIBLE, INFRARED, INFRARED])[order]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(b, b.clone()) for m in bns for b in m.buffers()]
    drops = [m for m in model.modules() if hasattr(m, "drop_prob")]
    rates = [m.drop_prob for m in drops]
    try:
        for m in drops:
            m.drop_prob = 0.0
        model.train()
        with torch.no_grad():
            out = model(images, modality)
        after = {name: buf.clone() for name, buf in model.named_buffers()}
    finally:
        model.eval()
        for m, rate in zip(drops, rates):
            m.drop_prob = rate
        for buf, value in saved:
            buf.copy_(value)
    inverse = torch.argsort(torch.as_tensor(order))
    feat, tokens = out["feat"][inverse], out["tokens"][inverse]
    ref = case["outputs_train"]
    torch.testing.assert_close(feat, ref["feats"], rtol=0, atol=TRAIN_ATOL)
    # the reference's feats[:B1] / feats[B1:] are the visible / infrared rows in batch order
    torch.testing.assert_close(out["feat"][modality == VISIBLE], ref["feats_rgb"], rtol=0, atol=TRAIN_ATOL)
    torch.testing.assert_close(out["feat"][modality == INFRARED], ref["feats_ir"], rtol=0, atol=TRAIN_ATOL)
    for i in range(k):
        torch.testing.assert_close(tokens[:2, i], ref["tokens_rgb"][i], rtol=0, atol=TRAIN_ATOL)
        torch.testing.assert_close(tokens[2:, i], ref["tokens_ir"][i], rtol=0, atol=TRAIN_ATOL)
    depth = case["params"]["depth"]
    for key, value in case["buffers_after_train"].items():
        torch.testing.assert_close(after[project_key(key, depth)], value, rtol=0, atol=TRAIN_ATOL)


def test_k6_depth2_recipe_weights_match_the_golden_checksums(k6):
    assert checksum_mismatches(k6.reference, k6.case["weights"]["checksums"]) == []
    assert len(k6.reference) == k6.case["params"]["num_state_dict_keys"]
    assert sum(v.numel() for v in k6.reference.values()) == k6.case["params"]["num_elements"]


def test_k6_depth2_eval_features_and_intermediates(k6):
    check_eval(k6)


def test_k6_depth2_flip_average_is_the_reference_descriptor(k6):
    x, out = k6.case["inputs"]["x"], k6.case["outputs_eval"]
    with torch.no_grad():
        raw = flip_average(k6.model, x, "infrared", normalize=False)
    torch.testing.assert_close(raw, out["modal2_extract_features"], **EVAL_TOL)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1]], ids=["rgb_then_ir", "interleaved"])
def test_k6_depth2_train_forward(k6, order):
    check_train(k6, order)


@pytest.mark.slow
def test_k4_full_encoder_against_golden(k4):
    assert checksum_mismatches(k4.reference, k4.case["weights"]["checksums"]) == []
    check_eval(k4)
    check_train(k4, [0, 1, 2, 3])


# ---------------------------------------------------------------- layout and sizes


def reference_key_roles(name):
    rows = [line.split() for line in open(os.path.join(GOLDEN, name)) if not line.startswith("#")]
    return [(key[len("module."):], tuple(int(s) for s in shape.split("x")) if shape != "scalar" else (), role)
            for _, key, shape, _, role in rows]


def test_reference_size_counts_match_the_released_layout():
    """Trainable tensors = the released 'used' keys, frozen = the head biases, nothing else."""
    with torch.device("meta"):
        model = TokenMatcherEncoder()
    roles = reference_key_roles("state_dict_keys.txt")
    used = sum(math.prod(shape) for _, shape, role in roles if role == "used")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == used  # 91.67 M
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["token_bns.%d.bias" % i for i in range(4)]
    assert model.pos_embed.shape == (1, 196, 768) and model.grid == (24, 8) and model.feat_dim == 3072


def test_stochastic_depth_rates():
    with torch.device("meta"):
        model = TokenMatcherEncoder()
    rates = [0.0 if isinstance(b.drop_path1, torch.nn.Identity) else b.drop_path1.drop_prob for b in model.blocks]
    expected = [i * 0.3 / 11 for i in range(12)]
    assert rates == pytest.approx(expected[:11])
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert model.last_block.drop_path1.drop_prob == pytest.approx(0.3)


# ---------------------------------------------------------------- pretrained weights (load_param)


def reference_pretrain_state(embed, depth=12, seed=0):
    """A TransReID-SSL-layout state dict (ICS stem as ``patch_embed``, [1, 129, E] position
    embedding, one class token) of width `embed`, with keys the loader must skip."""
    g = torch.Generator().manual_seed(seed)
    stem = [(key[len("thermal_module.thermal."):], shape) for key, shape, _ in reference_key_roles("state_dict_keys.txt")
            if key.startswith("thermal_module.thermal.")]
    state = OrderedDict(cls_token=torch.randn(1, 1, embed, generator=g), pos_embed=torch.randn(1, 129, embed, generator=g))
    for key, shape in stem:
        shape = (embed,) + shape[1:] if key.startswith("proj.") else shape
        state["patch_embed." + key] = (torch.zeros(shape, dtype=torch.int64) if key.endswith("num_batches_tracked")
                                       else torch.randn(shape, generator=g))
    block = {"norm1.weight": (embed,), "norm1.bias": (embed,), "attn.qkv.weight": (3 * embed, embed),
             "attn.qkv.bias": (3 * embed,), "attn.proj.weight": (embed, embed), "attn.proj.bias": (embed,),
             "norm2.weight": (embed,), "norm2.bias": (embed,), "mlp.fc1.weight": (4 * embed, embed),
             "mlp.fc1.bias": (4 * embed,), "mlp.fc2.weight": (embed, 4 * embed), "mlp.fc2.bias": (embed,)}
    for i in range(depth):
        for key, shape in block.items():
            state["blocks.%d.%s" % (i, key)] = torch.randn(shape, generator=g)
    state["norm.weight"], state["norm.bias"] = torch.randn(embed, generator=g), torch.randn(embed, generator=g)
    skipped = {"head.weight": torch.randn(10, embed, generator=g), "dist_token": torch.randn(1, 1, embed, generator=g),
               "fc.weight": torch.randn(3, embed, generator=g), "bottleneck.weight": torch.randn(embed, generator=g)}
    return state, skipped


def stem_name(key):
    return re.sub(r"\.(IN|BN)\.", lambda m: ".inorm." if m.group(1) == "IN" else ".bnorm.", key)


@pytest.fixture(scope="module")
def loaded_c48(tmp_path_factory):
    """A depth-12, K=4, width-48 encoder loaded from a DINO-style wrapped pretraining file."""
    state, skipped = reference_pretrain_state(48)
    path = str(tmp_path_factory.mktemp("pretrain") / "vit_ics_fake.pth")
    wrapped = {"module." + k: v for k, v in list(state.items()) + list(skipped.items())}
    torch.save({"teacher": wrapped, "args": argparse.Namespace(arch="vit_base"), "epoch": 100}, path)
    torch.manual_seed(0)
    model = TokenMatcherEncoder(num_tokens=4, embed_dim=48, num_heads=4)
    fresh = copy.deepcopy(model.state_dict())
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    return model, fresh, state, report, lines


def test_load_param_counts_match_the_reference(loaded_c48):
    model, _, _, report, lines = loaded_c48
    reference = re.search(r"Load (\d+) / (\d+) layers", golden("encoder_load_param.pt")["load_param_checks"]["log"])
    # the reference's 201 also counts the 5 tensors of its never-run BatchNorm template
    assert (report["loaded"], report["loadable"]) == (int(reference.group(1)), int(reference.group(2)) - 5)
    assert "Load 196 / 196 layers." in lines
    assert sorted(report["skipped"]) == ["bottleneck.weight", "dist_token", "fc.weight", "head.weight"]
    assert report["unmatched"] == [] and report["mismatched"] == []


def test_load_param_semantics(loaded_c48):
    model, fresh, state, _, _ = loaded_c48
    own = model.state_dict()
    assert torch.equal(own["cls_token"], state["cls_token"].expand(1, 4, 48))  # broadcast to all K
    for key in [k for k in state if k.startswith("patch_embed.")]:
        inner = stem_name(key[len("patch_embed."):])
        assert torch.equal(own["stems.visible." + inner], state[key]), key
        assert torch.equal(own["stems.infrared." + inner], state[key]), key
    for i in range(11):
        for key in [k for k in state if k.startswith("blocks.%d." % i)]:
            assert torch.equal(own[key], state[key]), key
    for key in [k for k in state if k.startswith("blocks.11.")]:
        assert torch.equal(own["last_block." + key[len("blocks.11."):]], state[key]), key
    assert torch.equal(own["last_norm.weight"], state["norm.weight"])
    assert torch.equal(own["last_norm.bias"], state["norm.bias"])
    assert torch.equal(own["pos_embed"][:, :4], fresh["pos_embed"][:, :4])  # class positions: fresh init
    grid = state["pos_embed"][:, 1:].reshape(1, 16, 8, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(own["pos_embed"][:, 4:], expected.reshape(1, 192, 48), rtol=0, atol=1e-6)
    for i in range(4):
        assert torch.equal(own["token_bns.%d.weight" % i], torch.ones(48))
        assert torch.equal(own["token_bns.%d.bias" % i], torch.zeros(48))
        assert not model.token_bns[i].bias.requires_grad


@pytest.mark.parametrize("case", [0, 1], ids=["K4", "K6"])
def test_resize_pos_embed_matches_golden(case):
    ref = golden("encoder_load_param.pt")["resize_pos_embed"][case]
    out = resize_pos_embed(ref["posemb_pretrained"], ref["posemb_new_model"], (24, 8), ref["K"], hw_ratio=2)
    torch.testing.assert_close(out, ref["output"], rtol=0, atol=1e-6)


def test_pretrained_shape_mismatch_is_reported_and_an_unusable_file_refused(tmp_path):
    state, _ = reference_pretrain_state(48, depth=2)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    path = str(tmp_path / "partial.pth")
    torch.save({"state_dict": state}, path)
    model = TokenMatcherEncoder(num_tokens=2, embed_dim=48, num_heads=4, depth=2)
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    assert report["mismatched"] == ["blocks.0.attn.qkv.weight (5, 5) -> blocks.0.attn.qkv.weight (144, 48)"]
    assert report["loaded"] == report["loadable"] - 1
    assert any("mismatched" in line for line in lines)
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(3)}}, path)
    with pytest.raises(PretrainedWeightsError, match="nothing in .* fits the encoder"):
        load_pretrained(model, path, log=lines.append)


def test_pretrained_file_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 48)}, "extra": Payload()}, path)
    model = TokenMatcherEncoder(num_tokens=2, embed_dim=48, num_heads=4, depth=2)
    with pytest.raises(PretrainedWeightsError, match="posix.getcwd"):
        load_pretrained(model, path)


# ---------------------------------------------------------------- behaviour on a tiny encoder


def tiny(**kwargs):
    torch.manual_seed(0)
    opts = dict(img_size=(64, 32), num_tokens=3, embed_dim=32, depth=2, num_heads=2, stem_width=8)
    opts.update(kwargs)
    return TokenMatcherEncoder(**opts)


def tiny_batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 32, generator=g), torch.tensor([0, 1, 1, 0, 0, 1, 0, 1][:n])


def test_tiny_shapes_and_eval_routing_per_row():
    model = tiny().eval()
    images, modality = tiny_batch()
    with torch.no_grad():
        mixed = model.embed(images, modality)
        vis = model.embed(images, "visible")
        ir = model.embed(images, "infrared")
        sets = model(images, modality)
    assert mixed.shape == (8, 96) and model.grid == (4, 2)
    expected = torch.where((modality == VISIBLE)[:, None], vis, ir)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(vis, ir)
    assert list(sets) == ["feat"]
    torch.testing.assert_close(sets["feat"], F.normalize(mixed, dim=1))


def test_tiny_train_outputs_and_stem_statistics_per_modality():
    model = tiny().train()
    images, modality = tiny_batch()
    out = model(images, modality)
    assert set(out) == set(TokenMatcherEncoder.train_outputs)
    assert out["feat"].shape == (8, 96) and out["tokens"].shape == (8, 3, 32)
    # feat = the per-token BNs of the raw tokens, over the whole batch
    for i, bn in enumerate(model.token_bns):
        t = out["tokens"][:, i]
        manual = (t - t.mean(0)) / torch.sqrt(t.var(0, unbiased=False) + bn.eps) * bn.weight
        torch.testing.assert_close(out["feat"][:, 32 * i:32 * (i + 1)], manual, rtol=1e-4, atol=1e-5)
    # a stem's BatchNorm statistics come from its own modality's rows only
    alone = tiny().train()
    alone.stems["visible"](images[modality == VISIBLE])
    for a, b in zip(model.stems["visible"].buffers(), alone.stems["visible"].buffers()):
        torch.testing.assert_close(a, b)
    out["feat"].sum().backward()
    assert model.token_bns[0].bias.grad is None and model.cls_token.grad is not None


def test_ghost_batches_equal_a_loop_over_chunks():
    """G=2: visible chunk j + infrared chunk j per pass; BN statistics kept from pass 0 only."""
    images, modality = tiny_batch()
    ghost = tiny(ghost_batches=2, drop_path=0.0).train()
    loop = tiny(drop_path=0.0).train()
    out = ghost(images, modality)
    vis, ir = torch.nonzero(modality == 0).squeeze(1), torch.nonzero(modality == 1).squeeze(1)
    feats = torch.zeros_like(out["feat"])
    after_first = None
    for j in range(2):
        rows = torch.cat([vis.chunk(2)[j], ir.chunk(2)[j]])
        part = loop(images[rows], modality[rows])
        feats[rows] = part["feat"]
        if j == 0:
            after_first = {k: v.clone() for k, v in loop.named_buffers()}
    torch.testing.assert_close(out["feat"], feats, rtol=1e-5, atol=1e-6)
    for name, buf in ghost.named_buffers():
        torch.testing.assert_close(buf, after_first[name], msg=name)
    one = tiny(drop_path=0.0).train()(images, modality)["feat"]
    assert not torch.allclose(one, out["feat"], atol=1e-3)  # the chunking matters


def test_flip_average_tiny():
    model = tiny().eval()
    images, modality = tiny_batch()
    with torch.no_grad():
        f, ff = model.embed(images, modality), model.embed(images.flip(3), modality)
        torch.testing.assert_close(flip_average(model, images, modality), F.normalize((f + ff) / 2, dim=1))
        torch.testing.assert_close(flip_average(model, images, modality, normalize=False), (f + ff) / 2)


def test_param_groups_hold_every_trainable_tensor_once():
    model = tiny()
    groups = model.param_groups(build_config(validate=False))
    assert [(g["name"], g["lr_factor"]) for g in groups] == [("encoder", 1.0)]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]


def test_bad_input_is_refused():
    model = tiny().eval()
    images, _ = tiny_batch(2)
    with pytest.raises(ValueError, match="0 \\(visible\\) or 1 \\(infrared\\)"):
        model(images, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="built for \\[N, 3, 64, 32\\]"):
        model(torch.zeros(2, 3, 32, 32), "visible")
    with pytest.raises(ConfigError, match="not divisible"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="even patch size"):
        tiny(patch_size=15)


def tokenmatcher_config(**overrides):
    cfg = build_config(validate=False, freeze=False)
    if "TOKENMATCHER" not in cfg.MODEL:
        cfg.MODEL.TOKENMATCHER = CN(dict(TOKENMATCHER_DEFAULTS))
    cfg.MODEL.NAME = "tokenmatcher"
    cfg.MODEL.PRETRAINED = False
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    cfg.INPUT.SIZE_TEST = [64, 32]
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for name in path:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return cfg


def test_from_config_and_registry():
    cfg = tokenmatcher_config(**{"MODEL.TOKENMATCHER.EMBED_DIM": 32, "MODEL.TOKENMATCHER.NUM_HEADS": 2,
                                 "MODEL.TOKENMATCHER.DEPTH": 2, "MODEL.TOKENMATCHER.STEM_WIDTH": 8,
                                 "MODEL.TOKENMATCHER.NUM_TOKENS": 6})
    model = MODELS.get("tokenmatcher").from_config(cfg, 5)
    assert (model.num_tokens, model.embed_dim, model.depth, model.img_size, model.ghost_batches) == (6, 32, 2, (64, 32), 4)
    cfg.INPUT.SIZE_TEST = [128, 64]
    with pytest.raises(ConfigError, match="INPUT.SIZE_TEST"):
        TokenMatcherEncoder.from_config(cfg, 5)
    cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAIN_PATH = True, ""
    with pytest.raises(PretrainedWeightsError, match="vit_base_ics_cfs_lup.pth"):
        TokenMatcherEncoder.from_config(cfg, 5)


def test_reference_defaults_of_the_config_keys():
    """The constructor's defaults are the reference's, and so are the keys' (when present)."""
    with torch.device("meta"):
        model = TokenMatcherEncoder()
    assert (model.num_tokens, model.embed_dim, model.depth, model.img_size) == (4, 768, 12, (384, 128))
    assert model.blocks[0].attn.num_heads == 12 and model.blocks[0].mlp.fc1.out_features == 3072
    assert model.blocks[0].norm1.eps == 1e-6 and model.stems["visible"].conv[0].out_channels == 64
    cfg = build_config(validate=False)
    if "TOKENMATCHER" in cfg.MODEL:
        assert dict(cfg.MODEL.TOKENMATCHER) == TOKENMATCHER_DEFAULTS
