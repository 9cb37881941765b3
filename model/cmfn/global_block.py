"""GlobalBlock, the HiFuse "Global Feature Block" of each MBUE branch (docs/cmfn.md).

A Swin-style block on x [B, C, H, W] -> [B, C, H, W]: LayerNorm (eps 1e-5), zero padding
(right/bottom) to multiples of the window size, cyclic shift by (-shift, -shift), window
multi-head self-attention with a relative-position bias (qkv bias, head_dim^-0.5 scale),
reverse shift, crop; then an MLP (C -> mlp_ratio*C -> C, GELU) with its own LayerNorm.
Both halves are residual with per-sample DropPath.

Released behaviour (``fixed=False``, what produced the published numbers):

* no shifted-window mask: shifted windows also attend across the wrap-around boundary;
* the zero-padded tokens (padding happens after the norm) are ordinary keys and values;
* quirk 1: the attention result A [B, H, W, C] is permuted to (B, H, C, W), made contiguous
  and the buffer re-read as [B, C, H, W] (H and C scrambled together; W preserved);
* quirk 2: the MLP reads x [B, C, H, W] permuted to (B, C, W, H), contiguous, as tokens
  [B, H*W, C] (each "token" = C consecutive elements of that buffer) and its output buffer
  is re-read directly as [B, C, H, W].

``fixed=True`` is a standard shifted-window block instead: tokens are the channels-last
view, the shifted-window attention mask is applied, padded tokens are excluded as keys,
and the results are put back with the inverse permutes. It has the same parameters.

Parameters at C=1024, 16 heads, window 8, MLP ratio 4: 12,599,824.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers import ConversionError, DropPath, rename_state_dict


def relative_position_index(window_size):
    """[N, N] index into the (2ws-1)^2 bias table for the tokens of a ws x ws window
    (row-major), as in Swin: (dy + ws - 1) * (2ws - 1) + (dx + ws - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x, ws):
    """[B, Hp, Wp, C] -> [B * nW, ws*ws, C]; windows row-major, batch-major."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows, ws, hp, wp):
    """[B * nW, ws*ws, C] -> [B, Hp, Wp, C] (inverse of window_partition)."""
    c = windows.shape[-1]
    x = windows.view(-1, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias.

    The qkv projection is applied per token before the windows are formed
    (:meth:`project`), so that tokens of the zero padding cost no matrix product:
    ``forward(qkv [B*nW, N, 3C], mask) -> [B*nW, N, C]`` (output-projected).
    ``mask``: additive [nW, N, N] (0 or -inf) or None.
    """

    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GlobalBlock: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from window_size alone, so not saved in checkpoints.
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size), persistent=False)

    def position_bias(self):
        """[heads, N, N] bias added to the attention logits."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def project(self, t, pad_h=0, pad_w=0):
        """qkv of the tokens t [B, H, W, C] zero-padded at the bottom/right -> [B, H+pad_h,
        W+pad_w, 3C].

        A zero token's qkv is exactly the qkv bias, so the padding is filled with the bias
        instead of multiplying zeros (half of the tokens of a 128x64 image's 8x4 map).
        """
        qkv = self.qkv(t)
        if pad_h or pad_w:
            b, h, w, c3 = qkv.shape
            fill = self.qkv.bias.to(qkv.dtype)
            if pad_w:
                qkv = torch.cat([qkv, fill.expand(b, h, pad_w, c3)], dim=2)
            if pad_h:
                qkv = torch.cat([qkv, fill.expand(b, pad_h, w + pad_w, c3)], dim=1)
        return qkv

    def forward(self, qkv, mask=None):
        bw, n, c3 = qkv.shape
        heads, c = self.num_heads, c3 // 3
        q, k, v = qkv.view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = self.position_bias().unsqueeze(0)
        if mask is not None:
            # Windows of each image share one mask; the fused attention kernels want a plain
            # [B*nW, heads, N, N] bias (smaller than copying q, k and v into another layout).
            nw = mask.shape[0]
            attn_mask = (attn_mask + mask.unsqueeze(1)).expand(bw // nw, -1, -1, -1, -1)
            attn_mask = attn_mask.reshape(bw, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class GlobalBlock(nn.Module):
    def __init__(self, dim, num_heads=16, window_size=8, shift_size=1, mlp_ratio=4.0,
                 drop_path=0.1, fixed=False):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"GlobalBlock: shift_size {shift_size} must be in [0, {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.fixed = fixed
        self.attn_norm = nn.LayerNorm(dim)
        self.attention = WindowAttention(dim, num_heads, window_size)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = DropPath(drop_path)
        self._mask_cache = {}

    def extra_repr(self):
        return f"window_size={self.window_size}, shift_size={self.shift_size}, fixed={self.fixed}"

    def attention_mask(self, h, w, device):
        """[nW, N, N] additive mask of the fixed variant for an h x w map (cached).

        A key is hidden (-inf) from a query when it is a padded token or lies in another
        shift region of the window. Rows of padded queries are left unmasked: their outputs
        are cropped away, and a fully masked row would give NaN.
        """
        key = (h, w, str(device))
        if key not in self._mask_cache:
            ws, s = self.window_size, self.shift_size
            hp, wp = h + (-h) % ws, w + (-w) % ws
            region = torch.zeros(1, hp, wp, 1, device=device)
            if s:
                bounds = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
                for i, rows in enumerate(bounds):
                    for j, cols in enumerate(bounds):
                        region[:, rows, cols] = 3 * i + j
            valid = torch.zeros(1, hp, wp, 1, device=device)
            valid[:, :h, :w] = 1
            if s:
                valid = torch.roll(valid, (-s, -s), (1, 2))
            region = window_partition(region, ws).squeeze(-1)
            valid = window_partition(valid, ws).squeeze(-1) > 0
            blocked = (region[:, :, None] != region[:, None, :]) | ~valid[:, None, :]
            blocked &= valid[:, :, None]
            mask = torch.zeros(blocked.shape, device=device).masked_fill_(blocked, float("-inf"))
            self._mask_cache[key] = mask
        return self._mask_cache[key]

    def window_attention(self, t):
        """Normalised tokens [B, H, W, C] -> qkv of the tokens zero-padded to whole windows,
        shift, window attention, unshift, crop -> [B, H, W, C]."""
        _, h, w, _ = t.shape
        ws, s = self.window_size, self.shift_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        hp, wp = h + pad_h, w + pad_w
        qkv = self.attention.project(t, pad_h, pad_w)
        if s:
            qkv = torch.roll(qkv, (-s, -s), (1, 2))
        mask = self.attention_mask(h, w, t.device) if self.fixed else None
        t = window_reverse(self.attention(window_partition(qkv, ws), mask), ws, hp, wp)
        if s:
            t = torch.roll(t, (s, s), (1, 2))
        return t[:, :h, :w]

    def forward(self, x):
        if self.fixed:
            t = x.permute(0, 2, 3, 1)
            t = t + self.drop_path(self.window_attention(self.attn_norm(t)))
            t = t + self.drop_path(self.mlp(self.mlp_norm(t)))
            return t.permute(0, 3, 1, 2)
        b, c, h, w = x.shape
        a = self.window_attention(self.attn_norm(x.permute(0, 2, 3, 1)))
        x = x + self.drop_path(a.permute(0, 1, 3, 2).contiguous().view(b, c, h, w))
        tokens = x.permute(0, 1, 3, 2).reshape(b, h * w, c)
        y = self.mlp(self.mlp_norm(tokens)).view(b, c, h, w)
        return x + self.drop_path(y)


def convert_released_state_dict(sd):
    """Released Global_block keys -> this module's keys: norm1 -> attn_norm, attn -> attention,
    norm2 -> mlp_norm, mlp.0 / mlp.3 -> mlp.fc1 / mlp.fc2. ``attn.relative_position_index``
    (a buffer derived from the window size) is checked against ours and dropped."""
    index_key = "attn.relative_position_index"
    if index_key in sd:
        index = sd[index_key]
        ws = int(round((index.shape[0] ** 0.5)))
        if index.shape != (ws * ws, ws * ws) or not torch.equal(
                index.cpu().long(), relative_position_index(ws)):
            raise ConversionError("GlobalBlock", index_key, "is not the standard Swin "
                                  f"relative-position index of a {ws}x{ws} window")
    rules = [("norm1.", "attn_norm."), ("attn.", "attention."), ("norm2.", "mlp_norm."),
             ("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2.")]
    return rename_state_dict(sd, rules, "GlobalBlock", drop=(index_key,))
