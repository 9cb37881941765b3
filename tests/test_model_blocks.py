"""Model blocks: parameter counts (the released modules' counts, docs/cmfn.md), initialisation,
shapes, converters, and the corrected variants (MODEL.CMFN.FIX.*) against independent
reference computations."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.cmfn import global_block, irmlp, mbue, wtconv
from model.cmfn.csc_cma import CSCCMA
from model.cmfn.dilated_bottleneck import DilatedBottleneck
from model.cmfn.global_block import GlobalBlock
from model.cmfn.hce import HCE
from model.cmfn.irmlp import IRMLP
from model.layers import ConversionError, DropPath, LayerNorm2d
from model.cmfn.local_block import LocalBlock
from model.cmfn.mbue import MBUE
from model.cmfn.mfa import MFA
from model.cmfn.wtconv import WTConv2d

torch.set_num_threads(2)

GOLDEN = Path(__file__).resolve().parent / "golden"
HAAR_FROZEN_D256 = 2 * 4 * 256 * 4  # wt_filter + iwt_filter of one released WTConv2d(256)
HAAR_FROZEN_D128 = 2 * 4 * 128 * 4


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def meta(factory):
    with torch.device("meta"):
        return factory()


# ---- parameter counts at full size (those of the released modules), built on the meta device
# (no memory, no forward)

@pytest.mark.parametrize("factory, expected", [
    (lambda: HCE(64, 128, 256), 485_120),
    (lambda: HCE(256, 256, 64), 1_836_800),
    (lambda: HCE(256, 256, 256), 2_034_176),
    (lambda: DilatedBottleneck(), 854_016),
    (lambda: MFA(256, 64, False), 63_264),
    (lambda: MFA(512, 256, True), 594_048),
    (lambda: MFA(1024, 512, True), 2_367_744),
    (lambda: LocalBlock(1024), 1_061_888),
    (lambda: LocalBlock(512), 268_800),
    (lambda: GlobalBlock(1024), 12_599_824),
    (lambda: GlobalBlock(512), 3_155_984),
    (lambda: IRMLP(768, 256), 8_456_192),
    (lambda: IRMLP(384, 128), 2_114_560),
    # The released modules list the fixed Haar filters as (frozen) parameters; here they are a
    # constant buffer, so these counts are the released ones minus those elements.
    (lambda: WTConv2d(256), 20_992 - HAAR_FROZEN_D256),
    (lambda: CSCCMA(256), 9_089_381 - HAAR_FROZEN_D256),
    (lambda: CSCCMA(128), 2_279_653 - HAAR_FROZEN_D128),
])
def test_parameter_counts(factory, expected):
    assert n_params(meta(factory)) == expected


def test_global_block_parameter_split():
    block = meta(lambda: GlobalBlock(1024))
    assert n_params(block.attention) == 4_202_000
    assert n_params(block.mlp) == 8_393_728


def test_mbue_parameter_counts_exclude_dead_tensors():
    # The released count includes every tensor the released MBUE builds; it never uses
    # compression1 nor the two 3x3 context convs, which are not built here.
    full = 51_797_738 - 2 * 2_359_296 - 262_656
    assert full == 46_816_490
    assert n_params(meta(lambda: MBUE(1024))) == full - 2 * HAAR_FROZEN_D256
    regdb = 12_983_786 - 2 * 589_824 - 65_792
    assert regdb == 11_738_346
    assert n_params(meta(lambda: MBUE(512, 128))) == regdb - 2 * HAAR_FROZEN_D128


def test_mbue_variant_parameter_counts():
    base = n_params(meta(lambda: MBUE(1024)))
    context = 2 * (2_359_296 + 256 * 256 + 2 * 256)  # 3x3 convs + CSC-CMA 1x1 conv and BN
    assert n_params(meta(lambda: MBUE(1024, fix_context=True))) == base + context
    assert n_params(meta(lambda: MBUE(1024, separate_compression=True))) == base + 262_656
    dense, depthwise = 768 * 768 * 9, 768 * 9
    assert n_params(meta(lambda: MBUE(1024, depthwise_irmlp=True))) == base - 2 * (dense - depthwise)
    assert n_params(meta(lambda: MBUE(1024, fix_swin=True))) == base


# ---- initialisation (the released init of each block)

def test_fresh_mfa_is_identity_on_the_main_path():
    torch.manual_seed(0)
    block = MFA(32, 16, downsample=True).eval()
    x_main, x_side = torch.randn(2, 32, 4, 3), torch.randn(2, 16, 8, 6)
    with torch.no_grad():
        assert torch.equal(block(x_main, x_side), x_main)
    for part in (block.channel_nl, block.position_nl):
        assert not part.out_proj.bn.weight.any() and not part.out_proj.bn.bias.any()


def test_initial_values():
    torch.manual_seed(0)
    table = GlobalBlock(64).attention.relative_position_bias_table
    assert table.shape == (225, 16)
    assert abs(table.std().item() - 0.02) < 0.002 and table.abs().max() <= 2.0
    fusion = CSCCMA(32)
    assert torch.equal(fusion.fusion_weights, torch.full((3,), 1 / 3))
    wt = fusion.enhancer.wtconv
    assert torch.all(wt.wavelet_scale == 0.1) and torch.all(wt.base_scale == 1)
    assert not any(n.startswith("haar") for n, _ in wt.named_parameters())
    block = MBUE(256, 64, fix_context=True)
    for conv in (block.branch1.up_proj, block.branch2.context_conv):
        fan_in = conv.weight[0].numel()
        assert abs(conv.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.05


def test_haar_bank_is_orthonormal_and_matches_released_filters():
    bank = wtconv.haar_filters(1).view(4, 4).double()
    assert torch.allclose(bank @ bank.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    released = torch.load(GOLDEN / "wtconv.pt", weights_only=True)["state_dict"]
    assert torch.equal(wtconv.haar_filters(8), released["wt_filter"])
    assert torch.equal(wtconv.haar_filters(8), released["iwt_filter"])


def test_wtconv_wavelet_path_is_exact_for_identity_kernels():
    # With an identity 3x3 kernel and scale 1 the wavelet path is analysis + synthesis, which
    # must reconstruct the input (odd sizes: padded then cropped).
    torch.manual_seed(0)
    block = WTConv2d(3)
    with torch.no_grad():
        block.base_scale.zero_()
        block.wavelet_scale.fill_(1)
        block.wavelet_conv.weight.zero_()
        block.wavelet_conv.weight[:, :, 1, 1] = 1
        x = torch.randn(2, 3, 7, 5)
        assert torch.allclose(block(x), x, atol=1e-5)


# ---- small shared layers

def test_layernorm2d_normalises_each_position_over_channels():
    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 6, 3, 4)
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    layer = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(layer.eval()(x), x)


# ---- shapes

def test_block_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 6)
    assert HCE(16, 8, 24)(x).shape == (2, 24, 12, 6)
    assert DilatedBottleneck(16, 8, 5)(x).shape == x.shape
    assert MFA(32, 16, True)(torch.randn(2, 32, 6, 3), x).shape == (2, 32, 6, 3)
    assert MFA(32, 16, False)(torch.randn(2, 32, 12, 6), x).shape == (2, 32, 12, 6)
    assert LocalBlock(16)(x).shape == x.shape
    for fixed in (False, True):
        assert GlobalBlock(32, 4, fixed=fixed)(torch.randn(2, 32, 9, 5)).shape == (2, 32, 9, 5)
    assert WTConv2d(16)(torch.randn(2, 16, 7, 5)).shape == (2, 16, 7, 5)
    assert IRMLP(48, 16, depthwise=True)(torch.randn(2, 48, 6, 3)).shape == (2, 16, 6, 3)
    assert CSCCMA(16, 4)(x, x).shape == x.shape
    out = MBUE(32, 8, num_heads=4, fix_swin=True, fix_context=True, depthwise_irmlp=True,
               separate_compression=True)(torch.randn(2, 32, 10, 5))
    assert out.shape == (6, 32, 10, 5)


# ---- converters

def test_converters_name_unknown_keys():
    case = torch.load(GOLDEN / "global_block.pt", weights_only=True)
    with pytest.raises(ConversionError, match="bogus.weight"):
        global_block.convert_released_state_dict({"bogus.weight": torch.zeros(1)})
    sd = dict(case["state_dict"])
    sd["attn.relative_position_index"] = sd["attn.relative_position_index"].flip(0)
    with pytest.raises(ConversionError, match="relative_position_index"):
        global_block.convert_released_state_dict(sd)
    with pytest.raises(ConversionError, match="wt_filter"):
        wtconv.convert_released_state_dict({"wt_filter": torch.ones(8, 1, 2, 2)})
    with pytest.raises(ConversionError, match="DEE_extra"):
        mbue.convert_released_state_dict({"DEE_extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="'fu1.bogus'"):
        mbue.convert_released_state_dict({"fu1.bogus": torch.zeros(1)})
    with pytest.raises(ConversionError, match="'fu2.feature_enhancer.0.wt_filter'"):
        mbue.convert_released_state_dict({"fu2.feature_enhancer.0.wt_filter": torch.ones(8, 1, 2, 2)})
    with pytest.raises(ConversionError, match="dense"):
        irmlp.convert_released_state_dict({"conv1.conv.weight": torch.zeros(4, 4, 3, 3)},
                                          depthwise=True)


# ---- corrected GlobalBlock (FIX.SWIN) against a brute-force reference

def _randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("relative_position_bias_table"):
                p.normal_()
            elif "norm" in name:
                p.uniform_(-0.1, 0.1)


def _reference_swin(block, x):
    """Standard shifted-window block computed query by query: a valid query attends the
    valid keys that share its shifted window and are not across the cyclic wrap (their offset
    is the same before and after the shift)."""
    b, c, h, w = x.shape
    ws, s = block.window_size, block.shift_size
    hp, wp = h + (-h) % ws, w + (-w) % ws
    attn = block.attention
    heads = attn.num_heads
    hd = c // heads
    t = x.permute(0, 2, 3, 1).double()
    norm1 = block.attn_norm
    n = F.layer_norm(t, (c,), norm1.weight.double(), norm1.bias.double(), norm1.eps)
    qkv = n @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.view(b, h, w, 3, heads, hd).unbind(3)
    table = attn.relative_position_bias_table.double()
    out = torch.zeros(b, h, w, c, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            ri, rj = (i - s) % hp, (j - s) % wp
            keys = [(a, e) for a in range(h) for e in range(w)
                    if (a - s) % hp // ws == ri // ws and (e - s) % wp // ws == rj // ws
                    and ri - (a - s) % hp == i - a and rj - (e - s) % wp == j - e]
            kk = torch.stack([k[:, a, e] for a, e in keys], 1)  # [b, n, heads, hd]
            vv = torch.stack([v[:, a, e] for a, e in keys], 1)
            idx = torch.tensor([(i - a + ws - 1) * (2 * ws - 1) + (j - e + ws - 1) for a, e in keys])
            logits = torch.einsum("bhd,bnhd->bhn", q[:, i, j], kk) * hd ** -0.5 + table[idx].T
            out[:, i, j] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), vv).reshape(b, c)
    t = t + out @ attn.proj.weight.double().T + attn.proj.bias.double()
    norm2 = block.mlp_norm
    m = F.layer_norm(t, (c,), norm2.weight.double(), norm2.bias.double(), norm2.eps)
    m = F.gelu(m @ block.mlp.fc1.weight.double().T + block.mlp.fc1.bias.double())
    t = t + m @ block.mlp.fc2.weight.double().T + block.mlp.fc2.bias.double()
    return t.permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("size, window, shift", [
    ((8, 8), 4, 0),   # no shift, no padding: plain window attention
    ((8, 12), 4, 2),  # shift, no padding
    ((9, 6), 4, 1),   # shift and padding on both axes
    ((5, 9), 4, 1),   # padding larger than the shift: some shift regions hold only padding
])
def test_fixed_global_block_matches_reference(size, window, shift):
    block = GlobalBlock(32, num_heads=4, window_size=window, shift_size=shift, drop_path=0.0,
                        fixed=True).eval()
    _randomise(block, 1)
    x = torch.randn(2, 32, *size)
    with torch.no_grad():
        assert torch.allclose(block(x), _reference_swin(block, x), atol=1e-4)


def test_fixed_global_block_mask_hides_padding_and_wrapped_keys():
    block = GlobalBlock(8, num_heads=2, window_size=4, shift_size=1, fixed=True)
    h, w = 6, 3  # padded to 8 x 4
    mask = block.attention_mask(h, w, torch.device("cpu"))
    valid = torch.zeros(1, 8, 4, 1)
    valid[:, :h, :w] = 1
    valid = global_block.window_partition(torch.roll(valid, (-1, -1), (1, 2)), 4).view(-1, 16) > 0
    for win in range(mask.shape[0]):
        rows = valid[win]
        assert torch.all(mask[win][rows][:, ~rows] == float("-inf"))  # padded keys: zero weight
        assert torch.all(mask[win][~rows] == 0)  # padded queries: unrestricted, never all -inf
        assert torch.all(mask[win].diagonal()[rows] == 0)  # a token always sees itself
    # the last window row / column mixes wrapped and unwrapped tokens: they are kept apart
    assert (mask[-1] == float("-inf")).any()


def test_fixed_global_block_gradients_are_finite_with_heavy_padding():
    torch.manual_seed(0)
    block = GlobalBlock(16, num_heads=2, window_size=8, shift_size=1, fixed=True)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)  # padded 16 x 16: padding-only regions
    block(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_fixed_global_block_changes_the_released_output():
    case = torch.load(GOLDEN / "global_block.pt", weights_only=True)
    a = case["init_args"]
    block = GlobalBlock(a["dim"], a["num_heads"], a["window_size"], a["shift_size"],
                        a["mlp_ratio"], a["drop_path"], fixed=True).eval()
    block.load_state_dict(global_block.convert_released_state_dict(case["state_dict"]))
    with torch.no_grad():
        out = block(case["inputs"]["x"])
    assert (out - case["outputs_eval"]["out"]).abs().max() > 0.1


# ---- corrected CSC-CMA context path, IRMLP, MBUE compression

def test_active_context_path_adds_the_projected_context():
    torch.manual_seed(0)
    plain = CSCCMA(16, 4).eval()
    fixed = CSCCMA(16, 4, context_dim=8, fixed_context=True).eval()
    missing = fixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("context_proj.") for k in missing)
    with torch.no_grad():
        fixed.context_proj.bn.running_mean.uniform_(-0.5, 0.5)
        local, global_ = torch.randn(2, 16, 6, 4), torch.randn(2, 16, 6, 4)
        context = torch.randn(2, 8, 3, 2)  # nearest-resized to 6 x 4
        proj = fixed.context_proj
        up = context.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        expected = plain(local, global_) + F.gelu(proj.bn(proj.conv(up)))
        assert torch.allclose(fixed(local, global_, context), expected, atol=1e-5)
    with pytest.raises(ValueError):
        CSCCMA(16, 4, fixed_context=True)


def test_depthwise_irmlp_is_depthwise_and_differs():
    torch.manual_seed(0)
    dense, depthwise = IRMLP(12, 4).eval(), IRMLP(12, 4, depthwise=True).eval()
    assert depthwise.spatial.weight.shape == (12, 1, 3, 3)
    state = {k: v for k, v in dense.state_dict().items() if k != "spatial.weight"}
    depthwise.load_state_dict(state, strict=False)
    with torch.no_grad():
        depthwise.spatial.weight.copy_(dense.spatial.weight[torch.arange(12), torch.arange(12)][:, None])
        x = torch.randn(2, 12, 5, 4)
        y = depthwise(x)
        # dense conv restricted to its diagonal (channel c -> c) = the depthwise conv
        dense.spatial.weight.copy_(torch.diag_embed(depthwise.spatial.weight[:, 0].permute(1, 2, 0))
                                   .permute(2, 3, 0, 1))
        assert torch.allclose(dense(x), y, atol=1e-6)


def _golden_mbue(**variant):
    case = torch.load(GOLDEN / "mbue.pt", weights_only=True)
    a = case["init_args"]
    block = MBUE(a["channel"], a["dim"], a["num_heads"], a["window_size"], a["shift_size"],
                 a["mlp_ratio"], **variant).eval()
    return case, block


def test_separate_compression_starts_as_the_released_model():
    case, block = _golden_mbue(separate_compression=True)
    sd = mbue.convert_released_state_dict(case["state_dict"], separate_compression=True)
    block.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = block(case["inputs"]["x"])
        assert torch.allclose(out, case["outputs_eval"]["out"], rtol=1e-5, atol=2e-5)
        block.branch1.compress_global.conv.weight.mul_(-1)
        assert (block(case["inputs"]["x"]) - out).abs().max() > 0.1


def test_mbue_variants_change_the_output():
    case, _ = _golden_mbue()
    x, golden = case["inputs"]["x"], case["outputs_eval"]["out"]
    for variant in ({"fix_swin": True}, {"fix_context": True}):
        _, block = _golden_mbue(**variant)
        sd = mbue.convert_released_state_dict(case["state_dict"],
                                              fix_context=variant.get("fix_context", False))
        missing = block.load_state_dict(sd, strict=False).missing_keys
        assert all(".fusion.context_proj." in k for k in missing)
        with torch.no_grad():
            out = block(x)
        assert torch.equal(out[:2], x)
        assert (out - golden).abs().max() > 0.01, variant
    assert "branch1.context_conv.weight" in mbue.convert_released_state_dict(
        case["state_dict"], fix_context=True)
