"""The released-FusionReID state-dict converter.

A synthetic state dict in the released layout (every key and shape of
tests/golden/fusionreid/state_dict_keys.txt, the Market-1501 model: 751 classes, 6 cameras,
with DDP's ``module.`` prefix) converts without unmapped keys, drops only the unused ViT ``fc``,
and loads into this project's model with ``strict=True``. (The whole-model golden tests in
test_fusionreid_model.py also load their keyed weights through the converter.)
"""
import os

import pytest
import torch

from fusionreid_golden import GOLDEN
from model.backbones.resnet_transreid import TransReIDResNet
from model.backbones.vit import OverlapViT
from model.fusionreid import convert
from model.fusionreid.convert import convert_state_dict
from model.fusionreid.fusionreid import FusionReID

LISTING = os.path.join(GOLDEN, "state_dict_keys.txt")


def released_layout(device="meta"):
    """{key: tensor of the listed shape and dtype} for every entry of the released listing."""
    out = {}
    with open(LISTING) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.split()[:3]
            dims = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
            out[key] = torch.empty(dims, dtype=getattr(torch, dtype), device=device)
    return out


def market_model():
    with torch.device("meta"):
        return FusionReID(TransReIDResNet("resnet50"), OverlapViT((256, 128), num_cameras=6), 751)


def test_released_layout_converts_completely_and_loads_strictly():
    released = released_layout()
    assert len(released) == 654
    state, report = convert_state_dict({"module." + k: v for k, v in released.items()})
    assert report["unmapped"] == []
    assert report["dropped"] == ["module.transformer.base.fc.weight", "module.transformer.base.fc.bias"]
    assert report["converted"] == len(state) == 652
    model = market_model()
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # a pure rename: the very tensors of the input, nothing copied or reshaped
    for key, value in released.items():
        mapped = convert.model_key(key)
        assert mapped is None or state[mapped] is value, key


def test_converted_names_say_what_they_are():
    samples = {
        "resnet.base.layer4.2.bn3.weight": "cnn.layer4.2.bn3.weight",
        "resnet.gap.p": "cnn_pool.p",
        "transformer.base.sie_embed": "vit.sie_embed",
        "transformer.base.blocks.11.attn.qkv.bias": "vit.blocks.11.attn.qkv.bias",
        "res_LRU.dwconv.bias": "dmf.lru_cnn.depthwise.bias",
        "former_LRU.ptconv.weight": "dmf.lru_vit.pointwise.weight",
        "former_LRU.act2.weight": "dmf.lru_vit.act2.weight",
        "gap_r.p": "dmf.pool_cnn.p",
        "gap_f.p": "dmf.pool_vit.p",
        "HTM.blocks.1.SEU2.blocks.0.attn.qkv.weight": "dmf.htm.layers.1.encode_vit.block.attn.qkv.weight",
        "HTM.blocks.0.SEU1.norm.bias": "dmf.htm.layers.0.encode_cnn.norm.bias",
        "HTM.blocks.0.MUF_RES.blocks.0.attn.norm.bias": "dmf.htm.layers.0.fuse_cnn.key_norm.bias",
        "HTM.blocks.1.MFU_FORMER.blocks.0.attn.v.weight": "dmf.htm.layers.1.fuse_vit.value.weight",
        "HTM.blocks.1.MFU_FORMER.blocks.0.mlp.fc2.bias": "dmf.htm.layers.1.fuse_vit.mlp.fc2.bias",
        "resnet.bottleneck.running_var": "heads.cnn.bnneck.running_var",
        "transformer.classifier.weight": "heads.vit.classifier.weight",
        "bottleneck_1.bias": "heads.lru_cnn.bnneck.bias",
        "classifier_2.weight": "heads.lru_vit.classifier.weight",
        "bottleneck_3.num_batches_tracked": "heads.htm_cnn.bnneck.num_batches_tracked",
        "classifier_4.weight": "heads.htm_vit.classifier.weight",
    }
    for released, mine in samples.items():
        assert convert.model_key(released) == mine, released


def test_unknown_keys_are_reported_not_guessed():
    released = released_layout()
    extra = {"HTM.blocks.0.SEU3.norm.weight": torch.zeros(1), "res_LRU.dwconv.gamma": torch.zeros(1),
             "classifier_5.weight": torch.zeros(1), "classifier_1.bias": torch.zeros(1),
             "HTM.blocks.0.MUF_RES.blocks.1.norm1.weight": torch.zeros(1), "base.conv1.weight": torch.zeros(1)}
    state, report = convert_state_dict(dict(released, **extra))
    assert sorted(report["unmapped"]) == sorted(extra)
    assert len(state) == 652


def test_a_partial_checkpoint_fails_the_strict_load_by_name():
    released = released_layout()
    del released["HTM.blocks.1.MUF_RES.blocks.0.attn.k.weight"]
    state, report = convert_state_dict(released)
    assert report["unmapped"] == []
    with pytest.raises(RuntimeError, match="dmf.htm.layers.1.fuse_cnn.key.weight"):
        market_model().load_state_dict(state, strict=True, assign=True)


def test_the_same_key_with_and_without_the_ddp_prefix_is_refused():
    with pytest.raises(ValueError, match="both map to 'cnn_pool.p'"):
        convert_state_dict({"resnet.gap.p": torch.ones(1), "module.resnet.gap.p": torch.ones(1)})


def test_block_key_maps_reject_foreign_names():
    assert convert.lru_key("dwconv.weight") == "depthwise.weight"
    assert convert.lru_key("act.weight") is None
    assert convert.seu_key("blocks.0.attn.qkv.weight") == "block.attn.qkv.weight"
    assert convert.seu_key("blocks.1.attn.qkv.weight") is None
    assert convert.mfu_key("blocks.0.attn.q.weight") == "query.weight"
    assert convert.mfu_key("blocks.0.attn.qkv.weight") is None
    assert convert.htm_layer_key("MFU_FORMER.blocks.0.attn.k.weight") == "fuse_vit.key.weight"
    assert convert.htm_key("blocks.3.SEU1.norm.weight") == "layers.3.encode_cnn.norm.weight"
    assert convert.dmf_key("gap_x.p") is None
