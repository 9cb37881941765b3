"""The per-key rule that fills the version-1 checkpoint fixtures (tests/golden/legacy/) with
weights, and the images their recorded features were computed on.

``rule(name, shape, dtype)``: ``u = torch.rand(shape)`` from a generator seeded with the
CRC-32 of the key; matrices and conv kernels ``(2u - 1) * sqrt(3 / fan_in)`` (times 0.05
inside the MFA non-local attentions, which have no softmax, so that their products stay
moderate), other weights and running variances ``u + 0.5``, biases and running means
``(2u - 1) * 0.1``, integer buffers 0. ``images(name)``: [4, 3, 64, 32] in [-2, 2] from the
CRC-32 of `name`. Every step is one float32 op, so the values are the same on every CPU.
"""
import math
import zlib

import torch


def rule(name, shape, dtype):
    if dtype == torch.int64:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("ascii")))
    u = torch.rand(shape, generator=g)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        w = (u * 2.0 - 1.0) * math.sqrt(3.0 / math.prod(shape[1:]))
        return w * 0.05 if "_nl." in name else w
    if leaf in ("weight", "running_var"):
        return u + 0.5
    return (u * 2.0 - 1.0) * 0.1


def images(name, n=4, h=64, w=32):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("ascii")))
    return (torch.rand((n, 3, h, w), generator=g) * 2.0 - 1.0) * 2.0
