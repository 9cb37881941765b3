"""FusionReID fusion blocks against the golden cases of the released code.

Cases (tests/golden/fusionreid/, made by the released modules at one thread, float32): the two
Local Refinement Units (``lru_res``, ``lru_former``), the Shared Encoding Unit (``seu``), the
Mutual Fusion Unit (``mfu``), one HTM layer (``htm_layer``) and the two-layer stack (``htm``,
keyed weights). Each case is run in eval mode (BN running statistics) and in train mode (batch
statistics, buffers updated once), and compared with the released outputs and intermediates
within the tolerances measured between thread counts (eval 1e-5, train 1e-4).
"""
import pytest
import torch

from fusionreid_golden import capture, load_golden
from keyed_weights import regenerate, verify
from model.fusionreid import convert
from model.fusionreid.htm import HeterogeneousTransmissionModule, HTMLayer
from model.fusionreid.lru import LocalRefinementUnit
from model.fusionreid.mfu import MutualFusionUnit
from model.fusionreid.seu import SharedEncodingUnit

EVAL_TOL = dict(rtol=1e-5, atol=1e-5)
TRAIN_TOL = dict(rtol=1e-4, atol=1e-4)


def golden_weights(case):
    """The released state dict of a case: stored, or regenerated from its keyed table (checked)."""
    if case["state_dict"]:
        assert not verify(case["state_dict"], case["weights"])
        return case["state_dict"]
    weights = regenerate(case["weights"])
    assert not verify(weights, case["weights"])
    return weights


def converted(case, key_map):
    out = {}
    for key, value in golden_weights(case).items():
        mapped = key_map(key)
        assert mapped is not None, key
        out[mapped] = value
    return out


def run_case(case, build, key_map, call, intermediates, outputs_as=lambda outs: outs):
    """Build, load, run eval then (fresh) train; compare outputs, intermediates and BN buffers."""
    inputs = [case["inputs"][n].clone() for n in case["input_order"]]
    originals = [t.clone() for t in inputs]
    state = converted(case, key_map)
    for mode, tol in (("eval", EVAL_TOL), ("train", TRAIN_TOL)):
        module = build()
        module.load_state_dict(state, strict=True)
        module.train(mode == "train")
        seen = capture(module, intermediates.values())
        with torch.no_grad():
            outs = outputs_as(call(module, *inputs))
        golden_outs = case["outputs_" + mode]
        for name, out in zip(case["output_names"], outs):
            ref = golden_outs[name]
            torch.testing.assert_close(out.reshape(ref.shape), ref, **tol, msg=lambda m: "%s %s: %s" % (mode, name, m))
        for ref_name, mine in intermediates.items():
            ref = case["intermediates_" + mode][ref_name]
            torch.testing.assert_close(seen[mine].reshape(ref.shape), ref, **tol,
                                       msg=lambda m: "%s %s: %s" % (mode, ref_name, m))
        if mode == "train":
            buffers = dict(module.named_buffers())
            for ref_name, ref in case["buffers_after_train"].items():
                mine = buffers[key_map(ref_name)]
                if ref.dtype == torch.int64:
                    assert torch.equal(mine, ref), ref_name
                else:
                    torch.testing.assert_close(mine, ref, **TRAIN_TOL)
    assert all(torch.equal(a, b) for a, b in zip(inputs, originals)), "the forward changed its inputs"


LRU_INTERMEDIATES = {"dwconv": "depthwise", "bn1": "bn1", "act1": "act1", "ptconv": "pointwise", "bn2": "bn2",
                     "act2": "act2"}


@pytest.mark.parametrize("name", ["lru_res", "lru_former"])
def test_local_refinement_unit_matches_released(name):
    case = load_golden(name + ".pt")
    args = case["init_args"]
    run_case(case, lambda: LocalRefinementUnit(args["dim"], args["out_dim"]), convert.lru_key,
             lambda m, x: (m(x),), LRU_INTERMEDIATES)


def test_local_refinement_unit_uses_one_prelu_slope_and_keeps_the_map_size():
    lru = LocalRefinementUnit(8, 6)
    assert lru.act1.weight.shape == (1,) and lru.act2.weight.shape == (1,)
    assert float(lru.act1.weight.detach()) == pytest.approx(0.25)
    assert lru(torch.randn(2, 8, 5, 3)).shape == (2, 6, 5, 3)


def test_shared_encoding_unit_matches_released():
    case = load_golden("seu.pt")
    inter = {"blocks.0.norm1": "block.norm1", "blocks.0.attn": "block.attn", "blocks.0.norm2": "block.norm2",
             "blocks.0.mlp": "block.mlp", "blocks.0": "block", "norm": "norm"}
    run_case(case, lambda: SharedEncodingUnit(case["init_args"]["embed_dim"]), convert.seu_key,
             lambda m, x: (m(x),), inter)


def test_shared_encoding_unit_has_no_qkv_bias_and_layernorm_eps_1e5():
    seu = SharedEncodingUnit(48)
    assert seu.block.attn.qkv.bias is None and seu.block.attn.proj.bias is not None
    norms = [m for m in seu.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(m.eps == 1e-5 for m in norms)


def test_mutual_fusion_unit_matches_released():
    case = load_golden("mfu.pt")
    inter = {"blocks.0.norm1": "norm1", "blocks.0.attn.norm": "key_norm", "blocks.0.attn": "proj",
             "blocks.0.norm2": "norm2", "blocks.0.mlp": "mlp"}
    run_case(case, lambda: MutualFusionUnit(case["init_args"]["embed_dim"]), convert.mfu_key,
             lambda m, s, y: (m(s, y),), inter)


def test_mutual_fusion_unit_values_skip_the_key_layernorm():
    """Against a loop reference: keys from LN_k(Y), values from the raw Y, one query per head."""
    torch.manual_seed(0)
    mfu = MutualFusionUnit(24, num_heads=3).eval()
    for p in mfu.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    s, y = torch.randn(2, 24), torch.randn(2, 7, 24)
    with torch.no_grad():
        out = mfu(s, y)
        q = mfu.query(mfu.norm1(s))
        k = mfu.key(mfu.key_norm(y))
        v = mfu.value(y)
        heads = []
        for h in range(3):
            sl = slice(8 * h, 8 * h + 8)
            w = torch.softmax((k[:, :, sl] @ q[:, sl].unsqueeze(-1)).squeeze(-1) / 8 ** 0.5, dim=1)
            heads.append((w.unsqueeze(-1) * v[:, :, sl]).sum(1))
        x = s + mfu.proj(torch.cat(heads, dim=1))
        ref = x + mfu.mlp.fc2(torch.nn.functional.gelu(mfu.mlp.fc1(mfu.norm2(x))))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_htm_layer_matches_released():
    case = load_golden("htm_layer.pt")
    inter = {"SEU1": "encode_cnn", "SEU2": "encode_vit", "MUF_RES.blocks.0.attn": "fuse_cnn.proj",
             "MUF_RES": "fuse_cnn", "MFU_FORMER.blocks.0.attn": "fuse_vit.proj", "MFU_FORMER": "fuse_vit"}
    run_case(case, lambda: HTMLayer(case["init_args"]["embed_dim"]), convert.htm_layer_key,
             lambda m, res, former: m(res, former), inter)


def test_htm_stack_matches_released_and_rereads_the_original_tokens():
    case = load_golden("htm.pt")
    args = case["init_args"]
    inter = {}
    for i in range(args["depth"]):
        inter.update({"blocks.%d.SEU1" % i: "layers.%d.encode_cnn" % i,
                      "blocks.%d.SEU2" % i: "layers.%d.encode_vit" % i,
                      "blocks.%d.MUF_RES" % i: "layers.%d.fuse_cnn" % i,
                      "blocks.%d.MFU_FORMER" % i: "layers.%d.fuse_vit" % i})

    def call(m, res, former, fea_1, fea_2):
        return m(res, former, fea_1.squeeze(1), fea_2.squeeze(1))

    run_case(case, lambda: HeterogeneousTransmissionModule(args["embed_dim"], args["depth"]), convert.htm_key, call,
             inter)
    # the second layer's encoders see [that layer's input summary; the ORIGINAL tokens]
    htm = HeterogeneousTransmissionModule(args["embed_dim"], args["depth"]).eval()
    htm.load_state_dict(converted(case, convert.htm_key))
    seen = {}
    for side in ("cnn", "vit"):
        getattr(htm.layers[1], "encode_" + side).register_forward_pre_hook(
            lambda _, args, side=side: seen.setdefault(side, args[0].clone()))
    inputs = case["inputs"]
    with torch.no_grad():
        htm(inputs["res"], inputs["former"], inputs["fea_1"].squeeze(1), inputs["fea_2"].squeeze(1))
    assert torch.equal(seen["cnn"][:, 1:], inputs["res"]) and torch.equal(seen["vit"][:, 1:], inputs["former"])
    torch.testing.assert_close(seen["cnn"][:, 0], case["intermediates_eval"]["blocks.0.MUF_RES"].squeeze(1), **EVAL_TOL)
    torch.testing.assert_close(seen["vit"][:, 0], case["intermediates_eval"]["blocks.0.MFU_FORMER"].squeeze(1),
                               **EVAL_TOL)
