"""CMFN: two-stem ResNet with HCE/MFA side path and the MBUE embedding expansion.

Data flow (``x`` main path, ``s`` side path, n = rows entering the stems; docs/cmfn.md):

1. ``s`` = stems: visible and infrared stems concatenated over the batch (train), or the
   stem of the given modality (eval). [n, c0, H/4, W/4]
2. ``x`` = layer1(s)                                       [n, c1, H/4, W/4]
3. ``s`` = HCE_A(s) = HCE(c0, 2c0, c1) -> HCE(c1, c1, c0)  [n, c0, H/4, W/4]
4. ``s`` = MFA1(main=x, side=s)                            [n, c1, H/4, W/4]
5. ``x`` = layer2(s)                                       [n, c2, H/8, W/8]
6-7. ``s`` = MFA2(main=x, side=HCE_B(s)), HCE_B = HCE(c1, c1, c1) on the MFA1 output
                                                           [n, c2, H/8, W/8]
SYSU/LLCM (``MODEL.CMFN.MBUE_AFTER layer3``):
8. ``x`` = layer3(s)                                       [n, c3, H/16, W/16]
9. ``s`` = DilatedBottleneck(c2, c2/2, dilation 5)(s)      [n, c2, H/8, W/8]
10. ``s`` = MFA3(main=x, side=s)                           [n, c3, H/16, W/16]
11. ``s`` = MBUE(c3, c3/4)(s) = [s; branch1; branch2] then dropout   [3n, c3, H/16, W/16]
12. ``x`` = layer4(s)                                      [3n, c4, H/16, W/16]; D = c4
RegDB (``MODEL.CMFN.MBUE_AFTER layer2``): MBUE(c2, c2/4) on the MFA2 output, then
layer3; D = c3. No layer5, MFA3 or layer4 is built.
13-15. GAP, BNNeck, classifier (:class:`model.heads.BNNeckHead`).

Widths come from the backbone's stage widths (c0..c4) so that ResNet-50 (64/256/512/1024/2048)
gives exactly the released modules and ResNet-18 (64/64/128/256/512) a proportional model:
HCE_A's inner HCE widens the stem to layer1's width and narrows back; HCE_B keeps layer1's width;
the dilated bottleneck keeps layer2's width with a half-width middle; each MFA's high width is
its main-path stage, its low width the side tensor's; MBUE compresses to a quarter.

Outputs of ``model(images [N,3,H,W], modality [N])`` (rows through the stem of their
modality). Train: ``{"pool": [3N, D] pre-BN, "logits": [3N, C], "ort": 0-d}``, the copies
[orig; branch1; branch2] in blocks of N rows in batch order. Eval: the L2-normalised sets
``pool_orig``, ``bn_orig``, ``pool_br1``, ``bn_br1``, ``pool_br2``, ``bn_br2``, each [N, D]
(the released feat1..feat6). Test embeddings (``embedding_presets``): ``sum6`` (every set,
weight 1: the released default), ``mix`` (pool sets 0.1, BN sets 0.9), ``orig`` (the original
copy's two sets), ``pool`` and ``bn`` (the three sets of one kind).
"""
import functools

import torch.nn.functional as F
from torch import nn

from model.cmfn import dilated_bottleneck as dilated_bottleneck_module
from model.cmfn import hce as hce_module
from model.cmfn import mbue as mbue_module
from model.cmfn import mfa as mfa_module
from model.backbones.resnet import build_backbone, num_stages_for
from model.cmfn.dilated_bottleneck import DilatedBottleneck
from model.cmfn.hce import HCE
from loss.orthogonality import orthogonality_loss
from model.base import ReIDModel
from model.heads import BNNeckHead
from model.layers import ConversionError
from model.registry import MODELS
from utils.errors import ConfigError
from model.cmfn.mbue import MBUE
from model.cmfn.mfa import MFA


MIX_POOL_WEIGHT, MIX_BN_WEIGHT = 0.1, 0.9
SET_NAMES = ("pool_orig", "bn_orig", "pool_br1", "bn_br1", "pool_br2", "bn_br2")


def embedding_presets(names):
    """The test embeddings over the sets `names` (all six for CMFN, the first two for the baseline)."""
    return {
        "sum6": {n: 1.0 for n in names},
        "mix": {n: MIX_POOL_WEIGHT if n.startswith("pool") else MIX_BN_WEIGHT for n in names},
        "orig": {n: 1.0 for n in names if n.endswith("_orig")},
        "pool": {n: 1.0 for n in names if n.startswith("pool_")},
        "bn": {n: 1.0 for n in names if n.startswith("bn_")},
    }


def eval_sets(pool, bn, names):
    """{set name: [N, D]} of the L2-normalised copies in `pool` and `bn` ([copies*N, D] each)."""
    copies = len(names) // 2
    pool, bn = F.normalize(pool, dim=1).chunk(copies), F.normalize(bn, dim=1).chunk(copies)
    out = {}
    for c in range(copies):
        out[names[2 * c]], out[names[2 * c + 1]] = pool[c], bn[c]
    return out


def mbue_options(cfg):
    """MBUE keyword arguments from ``cfg.MODEL`` (the FIX.* switches select corrected variants)."""
    m = cfg.MODEL.CMFN
    return dict(
        num_heads=m.NUM_HEADS,
        window_size=m.WINDOW_SIZE,
        shift_size=m.SHIFT_SIZE,
        mlp_ratio=m.MLP_RATIO,
        drop_path=m.DROP_PATH,
        dropout=m.DROPOUT,
        fix_swin=m.FIX.SWIN,
        fix_context=m.FIX.CONTEXT_PATH,
        depthwise_irmlp=m.FIX.DEPTHWISE_IRMLP,
        separate_compression=m.FIX.SEPARATE_COMPRESSION,
    )


@MODELS.register("cmfn")
class CMFN(ReIDModel):
    num_copies = 3
    train_outputs = ("pool", "logits", "ort")
    embedding_sets = SET_NAMES
    embedding_presets = embedding_presets(SET_NAMES)
    default_embedding = "sum6"

    def __init__(self, backbone, num_classes, mbue_after="layer3", mbue_kwargs=None):
        super().__init__()
        if mbue_after not in ("layer3", "layer2"):
            raise ValueError("MODEL.CMFN.MBUE_AFTER must be 'layer3' or 'layer2', got %r" % (mbue_after,))
        expected_stages = 4 if mbue_after == "layer3" else 3
        if backbone.num_stages != expected_stages:
            raise ConfigError(
                "MBUE after %s needs a backbone with %d stages, got %d"
                % (mbue_after, expected_stages, backbone.num_stages)
            )
        c0, c1, c2, c3, c4 = backbone.stage_channels
        mbue_kwargs = dict(mbue_kwargs or {})
        self.mbue_after = mbue_after
        self.backbone = backbone
        self.hce_a = nn.Sequential(HCE(c0, 2 * c0, c1), HCE(c1, c1, c0))
        self.mfa1 = MFA(c1, c0, downsample=False)
        self.hce_b = HCE(c1, c1, c1)
        self.mfa2 = MFA(c2, c1, downsample=True)
        if mbue_after == "layer3":
            self.dilated_bottleneck = DilatedBottleneck(c2, c2 // 2, dilation=5)
            self.mfa3 = MFA(c3, c2, downsample=True)
            self.mbue = MBUE(c3, c3 // 4, **mbue_kwargs)
            self.feat_dim = c4
        else:
            self.mbue = MBUE(c2, c2 // 4, **mbue_kwargs)
            self.feat_dim = c3
        self.head = BNNeckHead(self.feat_dim, num_classes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        backbone = build_backbone(cfg, num_stages_for(cfg))
        return cls(backbone, num_classes, cfg.MODEL.CMFN.MBUE_AFTER, mbue_options(cfg))

    def forward(self, images, modality, camids=None):
        net = self.backbone
        s = net.stem_rows(images, modality)
        x = net.layer1(s)
        s = self.mfa1(x, self.hce_a(s))
        x = net.layer2(s)
        s = self.mfa2(x, self.hce_b(s))
        if self.mbue_after == "layer3":
            x = net.layer3(s)
            s = self.mfa3(x, self.dilated_bottleneck(s))
            x = net.layer4(self.mbue(s))
        else:
            x = net.layer3(self.mbue(s))
        pool, bn = self.head(x)
        if self.training:
            return {"pool": pool, "logits": self.head.classify(bn), "ort": orthogonality_loss(pool, self.num_copies)}
        return eval_sets(pool, bn, self.embedding_sets)


def released_convert_options(cfg):
    """The MBUE converter's options matching a model built from `cfg`."""
    fix = cfg.MODEL.CMFN.FIX
    return dict(
        fix_context=fix.CONTEXT_PATH,
        separate_compression=fix.SEPARATE_COMPRESSION,
        depthwise_irmlp=fix.DEPTHWISE_IRMLP,
    )


def _released_stem(key, released_prefix, stem):
    """Released modality ResNet key -> (this project's key or None when unused)."""
    part, _, rest = key[len(released_prefix):].partition(".")
    if part in ("conv1", "bn1"):
        return "backbone.%s.%s.%s" % (stem, "conv" if part == "conv1" else "bn", rest)
    return None


def convert_released_state_dict(sd, mbue_after="layer3", **mbue_convert_options):
    """Map a released CMAF state dict onto this project's CMFN keys.

    Returns ``(state, dropped, unmapped)``: ``state`` maps this project's keys to the released
    tensors; ``dropped`` maps a group name to the number of released tensors left out because
    the released model never uses them (the two extra ResNet bodies, base conv1/bn1, the MBUE
    context convs and compression1, and on RegDB base.layer4 and layer5) or because they are
    constants the blocks rebuild and check (Haar filters, relative-position index); ``unmapped`` lists
    the released keys (or block conversion errors) that no rule covers.
    """
    full = mbue_after == "layer3"
    blocks = {  # released prefix -> (project prefix, block converter)
        "layer3.0.": ("hce_a.0.", hce_module.convert_released_state_dict),
        "layer3.1.": ("hce_a.1.", hce_module.convert_released_state_dict),
        "layer4.0.": ("hce_b.", hce_module.convert_released_state_dict),
        "MFA1.": ("mfa1.", mfa_module.convert_released_state_dict),
        "MFA2.": ("mfa2.", mfa_module.convert_released_state_dict),
        "DEE.": ("mbue.", functools.partial(mbue_module.convert_released_state_dict, **mbue_convert_options)),
    }
    if full:
        blocks["layer5."] = ("dilated_bottleneck.", dilated_bottleneck_module.convert_released_state_dict)
        blocks["MFA3."] = ("mfa3.", mfa_module.convert_released_state_dict)
    renames = {"bottleneck.": "head.bnneck.", "classifier.": "head.classifier."}
    stages = ["layer1", "layer2", "layer3"] + (["layer4"] if full else [])
    for stage in stages:
        renames["base_resnet.base.%s." % stage] = "backbone.%s." % stage

    state, dropped, unmapped = {}, {}, []
    block_inputs = {prefix: {} for prefix in blocks}
    for key, value in sd.items():
        block = next((p for p in blocks if key.startswith(p)), None)
        if block is not None:
            block_inputs[block][key[len(block):]] = value
            continue
        rename = next((p for p in renames if key.startswith(p)), None)
        if rename is not None:
            state[renames[rename] + key[len(rename):]] = value
            continue
        target, group = None, None
        if key.startswith("visible_module.visible."):
            target = _released_stem(key, "visible_module.visible.", "visible_stem")
            group = "visible_module.visible (unused ResNet body)"
        elif key.startswith("thermal_module.thermal."):
            target = _released_stem(key, "thermal_module.thermal.", "infrared_stem")
            group = "thermal_module.thermal (unused ResNet body)"
        elif key.startswith("base_resnet.base."):
            group = "base_resnet.base.%s (unused)" % key.split(".")[2]
        elif key.startswith("layer5.") and not full:
            group = "layer5 (unused in the RegDB configuration)"
        else:
            unmapped.append(key)
            continue
        if target is not None:
            state[target] = value
        else:
            dropped[group] = dropped.get(group, 0) + 1
    for released, (project, convert) in blocks.items():
        inputs = block_inputs[released]
        if not inputs:
            continue
        try:
            converted = convert(dict(inputs))
        except ConversionError as exc:
            unmapped.append("%s*: %s" % (released, exc))
            continue
        state.update({project + k: v for k, v in converted.items()})
        if len(inputs) > len(converted):
            dropped["%s* (never used, or constants checked against ours)" % released] = len(inputs) - len(converted)
    return state, dropped, unmapped
