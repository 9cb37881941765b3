"""CMFN: two-stem ResNet with HCE/MFA side path and the MBUE embedding expansion (spec 2.1, 2.1b).

Data flow (spec 2.1 steps 1-15; ``x`` main path, ``s`` side path, n = rows entering the stems):

1. ``s`` = stems: visible and infrared stems concatenated over the batch (train), or the
   stem of the given modality (eval). [n, c0, H/4, W/4]
2. ``x`` = layer1(s)                                       [n, c1, H/4, W/4]
3. ``s`` = HCE_A(s) = HCE(c0, 2c0, c1) -> HCE(c1, c1, c0)  [n, c0, H/4, W/4]
4. ``s`` = MFA1(main=x, side=s)                            [n, c1, H/4, W/4]
5. ``x`` = layer2(s)                                       [n, c2, H/8, W/8]
6-7. ``s`` = MFA2(main=x, side=HCE_B(s)), HCE_B = HCE(c1, c1, c1) on the MFA1 output
                                                           [n, c2, H/8, W/8]
SYSU/LLCM (``MODEL.MBUE_AFTER layer3``):
8. ``x`` = layer3(s)                                       [n, c3, H/16, W/16]
9. ``s`` = DilatedBottleneck(c2, c2/2, dilation 5)(s)      [n, c2, H/8, W/8]
10. ``s`` = MFA3(main=x, side=s)                           [n, c3, H/16, W/16]
11. ``s`` = MBUE(c3, c3/4)(s) = [s; branch1; branch2] then dropout   [3n, c3, H/16, W/16]
12. ``x`` = layer4(s)                                      [3n, c4, H/16, W/16]; D = c4
RegDB (``MODEL.MBUE_AFTER layer2``, spec 2.1b): MBUE(c2, c2/4) on the MFA2 output, then
layer3; D = c3. No layer5, MFA3 or layer4 is built.
13-15. GAP, BNNeck, classifier (:class:`model.head.BNNeckHead`).

Widths come from the backbone's stage widths (c0..c4) so that ResNet-50 (64/256/512/1024/2048)
gives exactly the released modules and ResNet-18 (64/64/128/256/512) a proportional model:
HCE_A's inner HCE widens the stem to layer1's width and narrows back; HCE_B keeps layer1's width;
the dilated bottleneck keeps layer2's width with a half-width middle; each MFA's high width is
its main-path stage, its low width the side tensor's; MBUE compresses to a quarter.

Outputs. Train: ``model(x_vis [B,3,H,W], x_ir [B,3,H,W]) -> (pool [3*2B, D] pre-BN,
logits [3*2B, C], loss_ort 0-d)``, rows [vis_orig, ir_orig, vis_br1, ir_br1, vis_br2, ir_br2]
in blocks of B. Eval: ``model(x [N,3,H,W], modality) -> (pool, bn)``, each [3N, D]
L2-normalised, rows [orig; branch1; branch2] in blocks of N.
"""
import functools

import torch.nn.functional as F
from torch import nn

from model import dilated_bottleneck as dilated_bottleneck_module
from model import hce as hce_module
from model import mbue as mbue_module
from model import mfa as mfa_module
from model.backbone import build_backbone, num_stages_for
from model.dilated_bottleneck import DilatedBottleneck
from model.hce import HCE
from model.head import BNNeckHead
from model.layers import ConversionError
from model.mbue import MBUE
from model.mfa import MFA


def orthogonality_loss(pool, num_copies=3):
    """Sum over rows of <branch1 row, branch2 row>, divided by ALL rows (training_recipe 3.4).

    ``pool`` is [num_copies * m, D] ordered [orig; br1; br2]; the released code computes the
    same value as the strict upper triangle of a per-row 2x2 Gram matrix, summed, over 3m.
    """
    m = pool.shape[0] // num_copies
    return (pool[m:2 * m] * pool[2 * m:3 * m]).sum() / pool.shape[0]


def mbue_options(cfg):
    """MBUE keyword arguments from ``cfg.MODEL`` (the FIX.* switches select corrected variants)."""
    m = cfg.MODEL
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


class CMFN(nn.Module):
    num_copies = 3

    def __init__(self, backbone, num_classes, mbue_after="layer3", mbue_kwargs=None):
        super().__init__()
        if mbue_after not in ("layer3", "layer2"):
            raise ValueError("MODEL.MBUE_AFTER must be 'layer3' or 'layer2', got %r" % (mbue_after,))
        expected_stages = 4 if mbue_after == "layer3" else 3
        if backbone.num_stages != expected_stages:
            raise ValueError(
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

    def forward(self, x, x_ir=None, modality="visible"):
        net = self.backbone
        s = net.stem_input(x, x_ir, modality)
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
            return pool, self.head.classify(bn), orthogonality_loss(pool, self.num_copies)
        return F.normalize(pool, dim=1), F.normalize(bn, dim=1)


def released_convert_options(cfg):
    """The MBUE converter's options matching a model built from `cfg`."""
    fix = cfg.MODEL.FIX
    return dict(
        fix_context=fix.CONTEXT_PATH,
        separate_compression=fix.SEPARATE_COMPRESSION,
        depthwise_irmlp=fix.DEPTHWISE_IRMLP,
    )


def build_cmfn(cfg, num_classes):
    backbone = build_backbone(cfg, num_stages_for(cfg))
    return CMFN(backbone, num_classes, cfg.MODEL.MBUE_AFTER, mbue_options(cfg))


def _released_stem(key, released_prefix, stem):
    """Released modality ResNet key -> (this project's key or None when unused)."""
    part, _, rest = key[len(released_prefix):].partition(".")
    if part in ("conv1", "bn1"):
        return "backbone.%s.%s.%s" % (stem, "conv" if part == "conv1" else "bn", rest)
    return None


def convert_released_state_dict(sd, mbue_after="layer3", **mbue_convert_options):
    """Map a released CMAF state dict (spec 2.12) onto this project's CMFN keys.

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
