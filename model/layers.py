"""Small layers shared by the CMFN building blocks, and the state-dict renaming helper.

* ``memory_format_of``: the memory format a block's outputs should keep (its input's).
* ``LayerNorm2d``: the channels-first LayerNorm of the released CSC-CMA: at every
  spatial position the C values are normalised with their biased variance, eps 1e-6 inside
  the square root, then a per-channel affine. Not GroupNorm(1, C), which would also reduce
  over H and W. Input and output [B, C, H, W], the output in the input's memory format.
* ``DropPath``: stochastic depth per sample (train mode only); any shape [B, ...].
* ``ConvBN``: conv (no bias) -> BatchNorm (momentum 0.1) -> optional ReLU, the unit of HCE,
  the dilated bottleneck and the MBUE compressions.
* ``rename_state_dict``: maps released state-dict keys to this project's keys by prefix,
  used by every block module's ``convert_released_state_dict``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConversionError(KeyError):
    """A released state-dict key (or its value) that a converter cannot map.

    ``key`` is the released key relative to the converter that raised; composite converters
    re-raise with their sub-block prefix added (``under``), so the message names the key as
    the caller passed it.
    """

    def __init__(self, owner, key, problem):
        super().__init__(owner, key, problem)
        self.owner, self.key, self.problem = owner, key, problem

    def under(self, prefix):
        return ConversionError(self.owner, prefix + self.key, self.problem)

    def __str__(self):
        return f"{self.owner}: released state-dict key '{self.key}' {self.problem}"


def memory_format_of(x):
    """``torch.channels_last`` for a channels-last strided 4-D tensor, else ``torch.contiguous_format``.

    A tensor that is both (e.g. H = W = 1) counts as contiguous.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class LayerNorm2d(nn.Module):
    """Per-position LayerNorm over the channel axis of [B, C, H, W] (eps 1e-6, biased variance).

    Computed by F.layer_norm on the channels-last (B, H, W, C) layout. The output has the
    memory format of the input: a channels-last input is normalised in its own layout (no
    copy), an NCHW input is copied to channels-last and the result copied back.
    Handing a channels-last result to the NCHW convolutions that follow would make each of
    them reorder its weight on every call (for IRMLP's dense 768 x 768 x 3 x 3 conv, once in
    the forward and again in the backward), which costs far more than the two small copies.
    """

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        memory_format = memory_format_of(x)
        y = F.layer_norm(x.permute(0, 2, 3, 1).contiguous(), self.weight.shape, self.weight,
                         self.bias, self.eps)
        return y.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

    def extra_repr(self):
        return f"{self.weight.numel()}, eps={self.eps}"


class DropPath(nn.Module):
    """Drops the whole residual branch of a sample with probability ``drop_prob`` (train only).

    Kept samples are scaled by 1 / (1 - drop_prob), so the expectation is unchanged.
    """

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class ConvBN(nn.Module):
    """conv k x k (no bias, 'same' padding dilation*(k-1)/2) -> BatchNorm2d -> optional ReLU.

    [B, in_ch, H, W] -> [B, out_ch, H/stride, W/stride]. A dilation-1 3x3 conv pads 1 (the
    released ConvX helper would not pad then, but every HCE of the released model is
    dilated, so that case never occurs there).
    """

    def __init__(self, in_ch, out_ch, kernel_size=1, stride=1, dilation=1, relu=False):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, momentum=0.1)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


def rename_state_dict(sd, rules, owner, drop=()):
    """Renames the keys of ``sd`` by prefix.

    ``rules``: list of (released_prefix, new_prefix); a key takes the longest matching
    released prefix. ``drop``: released prefixes (or whole keys) whose tensors are unused.
    A prefix ending in "." matches keys below it; otherwise it must equal the whole key.
    Raises ConversionError naming the first key no rule covers (``owner`` names the block).
    """
    def matches(key, prefix):
        return key.startswith(prefix) if prefix.endswith(".") else key == prefix

    out = {}
    for key, value in sd.items():
        if any(matches(key, p) for p in drop):
            continue
        best = None
        for old, new in rules:
            if matches(key, old) and (best is None or len(old) > len(best[0])):
                best = (old, new)
        if best is None:
            raise ConversionError(owner, key, "cannot be mapped (expected keys starting with "
                                  f"one of {[r[0] for r in rules]})")
        out[best[1] + key[len(best[0]):]] = value
    return out


def sub_state_dict(sd, prefix):
    """The entries of ``sd`` below ``prefix`` (a string ending in "."), with it removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_part(sd, released_prefix, new_prefix, convert):
    """Runs a sub-block converter on the entries below ``released_prefix`` and puts the result
    below ``new_prefix``; a ConversionError names the key with ``released_prefix``."""
    try:
        converted = convert(sub_state_dict(sd, released_prefix))
    except ConversionError as exc:
        raise exc.under(released_prefix) from None
    return add_prefix(converted, new_prefix)


def add_prefix(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}
