"""MBUE, the Multi-Branch Unified Encoder (released class Multi_FUE, attribute DEE; docs/cmfn.md).

x [B, C, H, W] -> [3B, C, H, W] = Dropout(cat[x, b1, b2] over the batch), the DEEN
"diverse embedding expansion" with two structurally identical branches (separate weights):

    L = LocalBlock(x), G = GlobalBlock(x)                 [B, C, H, W]
    o = CSCCMA(compress_l(L), compress_g(G), context)     [B, d, H, W]
    b = conv1x1 d->C (bias, Kaiming-normal) (ReLU(o))     [B, C, H, W]

Each compression is conv1x1 C->d (no bias) + BN. d = C/4 by default.

Released behaviour:
* branch 1 applies ONE compression to both L and G (its BN running statistics are updated
  twice per training forward); branch 2 has two. ``separate_compression=True`` gives branch 1
  its own second compression. The released, never-used ``compression1`` is not built.
* the context (a 3x3 conv C->d, Kaiming-normal, no bias) is computed by the released code and
  then ignored by CSC-CMA, so it is only built here with ``fix_context=True``, which also makes
  CSC-CMA use it.
Other switches: ``fix_swin`` (proper shifted-window GlobalBlocks), ``depthwise_irmlp``.

Parameters (released layout, context convs and compression1 not built, Haar filters not
parameters): C=1024: 46,800,106; C=512 (d=128): 11,730,154.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cmfn import csc_cma as csc_cma_module
from model.cmfn import global_block as global_block_module
from model.cmfn import local_block as local_block_module
from model.cmfn.csc_cma import CSCCMA
from model.cmfn.global_block import GlobalBlock
from model.layers import ConvBN, convert_part, rename_state_dict
from model.cmfn.local_block import LocalBlock


class MBUEBranch(nn.Module):
    """One expansion branch: x [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels, dim, num_heads, window_size, shift_size, mlp_ratio, drop_path,
                 fix_swin, fix_context, depthwise_irmlp, shared_compression):
        super().__init__()
        self.local_block = LocalBlock(channels)
        self.global_block = GlobalBlock(channels, num_heads, window_size, shift_size, mlp_ratio,
                                        drop_path, fixed=fix_swin)
        if shared_compression:
            self.compress = ConvBN(channels, dim, 1)
        else:
            self.compress_local = ConvBN(channels, dim, 1)
            self.compress_global = ConvBN(channels, dim, 1)
        self.shared_compression = shared_compression
        self.context_conv = None
        if fix_context:
            self.context_conv = nn.Conv2d(channels, dim, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(self.context_conv.weight)
        self.fusion = CSCCMA(dim, num_heads, context_dim=dim if fix_context else None,
                             fixed_context=fix_context, depthwise_irmlp=depthwise_irmlp)
        self.up_proj = nn.Conv2d(dim, channels, 1)
        nn.init.kaiming_normal_(self.up_proj.weight)

    def forward(self, x):
        local = self.local_block(x)
        if self.shared_compression:
            local = self.compress(local)
            global_ = self.compress(self.global_block(x))
        else:
            local = self.compress_local(local)
            global_ = self.compress_global(self.global_block(x))
        context = self.context_conv(x) if self.context_conv is not None else None
        return self.up_proj(F.relu(self.fusion(local, global_, context)))


class MBUE(nn.Module):
    def __init__(self, channels, dim=None, num_heads=16, window_size=8, shift_size=1,
                 mlp_ratio=4.0, drop_path=0.1, dropout=0.01, fix_swin=False, fix_context=False,
                 depthwise_irmlp=False, separate_compression=False):
        super().__init__()
        dim = channels // 4 if dim is None else dim
        common = dict(channels=channels, dim=dim, num_heads=num_heads, window_size=window_size,
                      shift_size=shift_size, mlp_ratio=mlp_ratio, drop_path=drop_path,
                      fix_swin=fix_swin, fix_context=fix_context,
                      depthwise_irmlp=depthwise_irmlp)
        self.branch1 = MBUEBranch(shared_compression=not separate_compression, **common)
        self.branch2 = MBUEBranch(shared_compression=False, **common)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(torch.cat([x, self.branch1(x), self.branch2(x)], dim=0))


def convert_released_state_dict(sd, fix_context=False, separate_compression=False,
                                depthwise_irmlp=False):
    """Released Multi_FUE keys -> this module's keys (the flags: the MBUE variant built).

    FC11/FC21 -> branch{1,2}.local_block, FC12/FC22 -> .global_block, fu1/fu2 -> .fusion,
    FC1/FC2 -> .up_proj, compression2 -> branch1.compress (with ``separate_compression``
    copied into both branch1.compress_local and .compress_global, so the converted model
    starts as the released one), compression3/4 -> branch2.compress_local/.compress_global.
    Dropped: compression1 (never used) and FC13/FC23 (the context convs, whose output the
    released model discards) unless ``fix_context`` keeps them as branch{1,2}.context_conv
    (CSC-CMA's context projection then has no released counterpart). ``depthwise_irmlp``
    raises (the released IRMLP 3x3 weights are dense).
    """
    composite = []
    rules = [("compression2.0.", "branch1.compress.conv."), ("compression2.1.", "branch1.compress.bn.")]
    drop = ["compression1."]
    for k in ("1", "2"):
        branch = f"branch{k}."
        composite += [
            (f"FC{k}1.", branch + "local_block.", local_block_module.convert_released_state_dict),
            (f"FC{k}2.", branch + "global_block.", global_block_module.convert_released_state_dict),
            (f"fu{k}.", branch + "fusion.",
             lambda part: csc_cma_module.convert_released_state_dict(part, depthwise_irmlp)),
        ]
        rules.append((f"FC{k}.", branch + "up_proj."))
        if fix_context:
            rules.append((f"FC{k}3.", branch + "context_conv."))
        else:
            drop.append(f"FC{k}3.")
    for released, side in (("compression3.", "local"), ("compression4.", "global")):
        rules += [(released + "0.", f"branch2.compress_{side}.conv."),
                  (released + "1.", f"branch2.compress_{side}.bn.")]
    plain = {k: v for k, v in sd.items() if not k.startswith(tuple(c[0] for c in composite))}
    out = rename_state_dict(plain, rules, "MBUE", drop=drop)
    for released, new, convert in composite:
        out.update(convert_part(sd, released, new, convert))
    if separate_compression:
        for key in [k for k in out if k.startswith("branch1.compress.")]:
            value = out.pop(key)
            rest = key[len("branch1.compress."):]
            out["branch1.compress_local." + rest] = value
            out["branch1.compress_global." + rest] = value
    return out
