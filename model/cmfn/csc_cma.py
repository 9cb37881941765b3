"""CSC-CMA, the Channel-Spatial-Cross attention-guided cross-modality alignment fusing the
compressed local and global features of an MBUE branch (released class
EnhancedCrossAttentionHFF with ch_1 = ch_2 = ch_int = ch_out = d, linear attention; its place
in the model: docs/cmfn.md).

Inputs f_l, f_g [B, d, H, W] (and a context tensor), output [B, d, H, W]:

1. alignment: la = align_l(f_l), ga = align_g(f_g), each conv1x1 -> channels-first
   LayerNorm (eps 1e-6) -> GELU -> conv1x1 (convs with bias);
2. cross attention of linear complexity: tokens [B, HW, d], q from ga, k and v from la,
   split into heads; q softmaxed over its features, k over the tokens; out = q (kᵀ v) per
   head, merged, out-projected and put back to [B, d, H, W];
3. spatial gate on la: sigmoid(conv7x7([max_c la, mean_c la])) * la;
4. channel gate on ga: sigmoid(conv1x1(ReLU(conv1x1(GAP(ga))))) * ga (hidden d/8, no bias);
5. fused = Σ softmax(w)_i * [cross, spatial, channel]_i with w (3 values) initialised to 1/3;
6. e = enhancer(fused) + fused, enhancer = WTConv2d -> BN -> GELU -> conv1x1 -> BN;
7. out = IRMLP(LayerNorm2d(cat[f_l, f_g, e]))  (3d -> d);
8. return e + out.

Every step keeps the memory format of the inputs (NCHW or channels-last), so that no
convolution here reorders its weight for an input of the other layout.

Released behaviour: the context argument is ignored (the released MBUE builds the module
without a context dimension, yet computes and passes the context). ``fixed_context=True`` activates the path the paper figure
draws: the context [B, context_dim, h', w'] is nearest-resized to H x W, mapped by
conv1x1 (context_dim -> d, no bias) -> BN -> GELU and added to ``out`` before step 8.
``depthwise_irmlp`` selects IRMLP's corrected depthwise 3x3 conv.

Parameters at d=256: 9,081,189 here (the released 9,089,381 includes 8,192 frozen Haar filter
elements that are a constant buffer here), of which IRMLP 8,456,192.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cmfn import irmlp as irmlp_module
from model.cmfn import wtconv as wtconv_module
from model.cmfn.irmlp import IRMLP
from model.layers import LayerNorm2d, convert_part, memory_format_of, rename_state_dict
from model.cmfn.wtconv import WTConv2d


class AlignBlock(nn.Module):
    """conv1x1 -> LayerNorm2d -> GELU -> conv1x1, [B, d, H, W] -> [B, d, H, W]."""

    def __init__(self, dim):
        super().__init__()
        self.conv_in = nn.Conv2d(dim, dim, 1)
        self.norm = LayerNorm2d(dim)
        self.conv_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return self.conv_out(F.gelu(self.norm(self.conv_in(x))))


class LinearCrossAttention(nn.Module):
    """Queries from one map, keys/values from another, with O(N) (kᵀ v) attention.

    query_map, key_map [B, d, H, W] -> [B, d, H, W].
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CSCCMA: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query_map, key_map):
        b, d, h, w = query_map.shape
        heads = self.num_heads
        q_tokens = query_map.flatten(2).transpose(1, 2)
        kv_tokens = key_map.flatten(2).transpose(1, 2)

        def split(t):
            return t.view(b, h * w, heads, d // heads).transpose(1, 2)

        q = split(self.q_proj(q_tokens)).softmax(dim=-1)
        k = split(self.k_proj(kv_tokens)).softmax(dim=-2)
        v = split(self.v_proj(kv_tokens))
        out = torch.matmul(q, torch.matmul(k.transpose(-2, -1), v))
        out = self.out_proj(out.transpose(1, 2).reshape(b, h * w, d))
        # The token-major result read as [B, d, H, W] is channels-last strided; the rest of
        # CSC-CMA runs in the layout of its inputs (see LayerNorm2d for why it matters).
        return out.transpose(1, 2).reshape(b, d, h, w).contiguous(memory_format=memory_format_of(query_map))


class SpatialGate(nn.Module):
    """x * sigmoid(conv7x7([channel max, channel mean])), [B, d, H, W] -> same."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x):
        stats = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        stats = stats.contiguous(memory_format=memory_format_of(x))
        return x * torch.sigmoid(self.conv(stats))


class ChannelGate(nn.Module):
    """x * sigmoid(conv1x1(ReLU(conv1x1(GAP(x))))), hidden d // 8, no biases."""

    def __init__(self, dim, reduction=8):
        super().__init__()
        self.reduce = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.expand = nn.Conv2d(dim // reduction, dim, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class CSCCMA(nn.Module):
    def __init__(self, dim, num_heads=16, context_dim=None, fixed_context=False,
                 depthwise_irmlp=False):
        super().__init__()
        self.local_align = AlignBlock(dim)
        self.global_align = AlignBlock(dim)
        self.cross_attention = LinearCrossAttention(dim, num_heads)
        self.spatial_gate = SpatialGate()
        self.channel_gate = ChannelGate(dim)
        self.fusion_weights = nn.Parameter(torch.full((3,), 1.0 / 3.0))
        self.enhancer = nn.Sequential(OrderedDict(
            wtconv=WTConv2d(dim, 3), bn1=nn.BatchNorm2d(dim), act=nn.GELU(),
            pointwise=nn.Conv2d(dim, dim, 1), bn2=nn.BatchNorm2d(dim)))
        self.fusion_norm = LayerNorm2d(3 * dim)
        self.irmlp = IRMLP(3 * dim, dim, depthwise=depthwise_irmlp)
        self.fixed_context = fixed_context
        if fixed_context:
            if context_dim is None:
                raise ValueError("CSCCMA: fixed_context=True needs context_dim")
            self.context_proj = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(context_dim, dim, 1, bias=False), bn=nn.BatchNorm2d(dim),
                act=nn.GELU()))

    def forward(self, local, global_, context=None):
        la = self.local_align(local)
        ga = self.global_align(global_)
        weights = self.fusion_weights.softmax(dim=0)
        fused = (weights[0] * self.cross_attention(ga, la) + weights[1] * self.spatial_gate(la)
                 + weights[2] * self.channel_gate(ga))
        enhanced = self.enhancer(fused) + fused
        out = self.irmlp(self.fusion_norm(torch.cat([local, global_, enhanced], dim=1)))
        if self.fixed_context:
            if context is None:
                raise ValueError("CSCCMA with fixed_context=True needs a context tensor")
            if context.shape[-2:] != out.shape[-2:]:
                context = F.interpolate(context, size=out.shape[-2:], mode="nearest")
            out = out + self.context_proj(context)
        return enhanced + out


def convert_released_state_dict(sd, depthwise_irmlp=False):
    """Released EnhancedCrossAttentionHFF keys -> this module's keys.

    local_align / global_align .0/.1/.3 -> .conv_in/.norm/.conv_out; q/k/v/out_proj ->
    cross_attention.*; spatial_attn.0 -> spatial_gate.conv; channel_attn.1/.3 ->
    channel_gate.reduce/.expand; feature_enhancer.0..4 -> enhancer.wtconv/bn1/-/pointwise/bn2
    (WTConv2d converter); norm -> fusion_norm; final_fusion -> irmlp (IRMLP converter).
    The released model has no context projection.
    """
    rules = [("fusion_weights", "fusion_weights"), ("norm.", "fusion_norm."),
             ("spatial_attn.0.", "spatial_gate.conv."),
             ("channel_attn.1.", "channel_gate.reduce."),
             ("channel_attn.3.", "channel_gate.expand."),
             ("feature_enhancer.1.", "enhancer.bn1."),
             ("feature_enhancer.3.", "enhancer.pointwise."),
             ("feature_enhancer.4.", "enhancer.bn2.")]
    for side in ("local_align", "global_align"):
        rules += [(f"{side}.0.", f"{side}.conv_in."), (f"{side}.1.", f"{side}.norm."),
                  (f"{side}.3.", f"{side}.conv_out.")]
    rules += [(f"{p}_proj.", f"cross_attention.{p}_proj.") for p in ("q", "k", "v", "out")]
    composite = (("feature_enhancer.0.", "enhancer.wtconv.", wtconv_module.convert_released_state_dict),
                 ("final_fusion.", "irmlp.",
                  lambda s: irmlp_module.convert_released_state_dict(s, depthwise=depthwise_irmlp)))
    plain = {k: v for k, v in sd.items() if not any(k.startswith(c[0]) for c in composite)}
    out = rename_state_dict(plain, rules, "CSCCMA")
    for old, new, convert in composite:
        out.update(convert_part(sd, old, new, convert))
    return out
