"""Helpers shared by the IV-REID golden tests (tests/golden/ivreid/).

The full-model golden files do not store the ResNet-50 weights or the images; both follow a
rule written in tests/golden/ivreid/README.md. For a tensor named NAME (a key of the
reference state dict; the auxiliary heads' keys prefixed ``ide_net.``; the images ``input``)
the values come from ``torch.rand(shape, generator=Generator().manual_seed(crc32(NAME)))``,
mapped by the key's suffix (:func:`rule_tensor`, :func:`rule_images`). A *digest table*
summarises tensors as ``(sum, sum |x|, sum x^2)`` in float64 and their first 8 values
(:func:`digest`).
"""
import contextlib
import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

GOLDEN = Path(__file__).resolve().parent / "golden" / "ivreid"


def golden(name):
    return torch.load(GOLDEN / name, weights_only=True)


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to `n` inside the block (the golden files were made at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rule_generator(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode("ascii")))


def rule_tensor(name, shape):
    """The rule value of the reference tensor `name` of `shape`."""
    if name.endswith("num_batches_tracked"):
        return torch.tensor(0)
    u = torch.rand(shape, generator=rule_generator(name))
    if name.endswith("weight") and len(shape) >= 2:
        return (u * 2.0 - 1.0) * math.sqrt(3.0 / math.prod(shape[1:]))
    if name.endswith("weight") or name.endswith("running_var"):
        return u + 0.5
    assert name.endswith(("bias", "running_mean")), name
    return (u * 2.0 - 1.0) * 0.1


def rule_images(n=8, h=384, w=128):
    """The rule images [n, 3, h, w] (float32)."""
    x = (torch.rand((n, 3, h, w), generator=rule_generator("input")) * 2.0 - 1.0) * 2.0
    x = x * (torch.rand((n, 1, 1, 1), generator=rule_generator("input_scale")) + 0.25)
    return x + (torch.rand((n, 3, 1, 1), generator=rule_generator("input_shift")) * 2.0 - 1.0)


def rule_reference_state(keys, aux_keys=()):
    """The rule state dict under the reference names: ``keys`` / ``aux_keys`` are
    ``[key, shape, ...]`` rows (``model_forward.pt``'s ``state_dict_keys`` and
    ``aux_state_dict_keys``); the auxiliary keys get their ``ide_net.`` prefix."""
    state = {k: rule_tensor(k, shape) for k, shape, *_ in keys}
    state.update({"ide_net." + k: rule_tensor("ide_net." + k, shape) for k, shape, *_ in aux_keys})
    return state


def digest(tensors):
    """(stats [n, 3] = (sum, sum |x|, sum x^2), head [n, 8] = first 8 values, NaN-padded), float64."""
    values = [t.double().flatten() for t in tensors]
    stats = torch.stack([torch.stack([v.sum(), v.abs().sum(), (v * v).sum()]) for v in values])
    head = torch.stack([F.pad(v[:8], (0, 8 - v[:8].numel()), value=math.nan) for v in values])
    return stats, head
