"""Keyed pseudo-random tensors: the weight rule of the FusionReID golden cases.

The large golden cases do not store their weights; every float entry of a case's state dict (and
every input, under the key ``'input:' + name``) is a pure function of the case seed, the tensor's
key in the reference state dict, its shape and its value range:

    seed  = (crc32(key) + (case_seed << 32)) mod 2**64
    z_i   = splitmix64 finaliser of seed + i * 0x9E3779B97F4A7C15, i = 1..n   (mod 2**64)
    u_i   = (z_i >> 11) * 2**-53                       float64 in [0, 1)
    value = float32(lo + (hi - lo) * u_i), reshaped in C order

Integer entries (BN ``num_batches_tracked``) are 0. A golden file's ``weights`` table lists, per
key, ``shape``, ``dtype``, ``lo``, ``hi`` and the float64 ``sum`` / ``abs_sum`` of the float32
values (numpy pairwise summation, so independent of thread count) to check a regeneration.

API:
    keyed_uniform(key, shape, lo, hi, case_seed) -> float32 torch tensor of ``shape``
    keyed_numpy(key, shape, lo, hi, case_seed)   -> the same as a float32 numpy array
    kind_and_range(key, shape) -> (kind, lo, hi)  the range rule the cases were made with
    regenerate(weights_table, dtype=None) -> {key: tensor}  from a file's ``weights`` dict
    checksum(tensor) -> (sum, abs_sum)            float64, numpy pairwise summation
    verify(tensors, weights_table) -> [mismatching keys]
"""
import math
import zlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
# Elements per vectorised block: bounds the temporaries to a few tens of MB.
_CHUNK = 1 << 21


def _key_seed(key, case_seed):
    return (zlib.crc32(key.encode()) + (int(case_seed) << 32)) & _MASK64


def _uniform01(seed, n):
    out = np.empty(n, dtype=np.float64)
    base = np.uint64(seed)
    with np.errstate(over="ignore"):
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            z = np.arange(start + 1, stop + 1, dtype=np.uint64)
            z *= _GOLDEN
            z += base
            z ^= z >> np.uint64(30)
            z *= _MIX1
            z ^= z >> np.uint64(27)
            z *= _MIX2
            z ^= z >> np.uint64(31)
            z >>= np.uint64(11)
            out[start:stop] = z
    out *= 2.0 ** -53
    return out


def keyed_numpy(key, shape, lo, hi, case_seed):
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    u = _uniform01(_key_seed(key, case_seed), n)
    values = (float(lo) + (float(hi) - float(lo)) * u).astype(np.float32)
    return values.reshape(shape)


def keyed_uniform(key, shape, lo, hi, case_seed):
    return torch.from_numpy(keyed_numpy(key, shape, lo, hi, case_seed))


def kind_and_range(key, shape):
    """The range rule of the golden cases for a reference state-dict key."""
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return "count", 0.0, 0.0
    if leaf == "running_mean":
        return "running_mean", -0.1, 0.1
    if leaf == "running_var":
        return "running_var", 0.5, 1.5
    if leaf in ("cls_token", "pos_embed", "sie_embed"):
        return "token", -0.35, 0.35
    if leaf == "p" and len(shape) == 1:
        return "gem_p", 2.5, 3.5
    if leaf == "bias":
        return "bias", -0.1, 0.1
    if len(shape) >= 2:
        a = math.sqrt(3.0 / float(np.prod(shape[1:])))
        return "weight", -a, a
    if leaf == "weight" and shape == (1,):
        # A one-element 1-D weight is the slope of nn.PReLU().
        return "prelu", 0.05, 0.45
    if leaf == "weight" and key.endswith("bn3.weight"):
        return "norm_weight_damped", 0.1, 0.3
    if leaf == "weight":
        # Any other 1-D weight is a BN / LN gain.
        return "norm_weight", 0.5, 1.5
    raise KeyError("no keyed range rule for %r with shape %s" % (key, shape))


def regenerate(weights_table, dtype=None):
    """Tensors of a golden file's ``weights`` dict (``{'case_seed', 'keys': {...}}``).

    ``dtype`` (e.g. ``torch.float64``) casts the float tensors after generation, so a float64 run
    uses exactly the float32 values widened.
    """
    case_seed = weights_table["case_seed"]
    out = {}
    for key, entry in weights_table["keys"].items():
        if entry["dtype"] == "int64":
            out[key] = torch.zeros(entry["shape"], dtype=torch.int64)
            continue
        tensor = keyed_uniform(key, entry["shape"], entry["lo"], entry["hi"], case_seed)
        out[key] = tensor if dtype is None else tensor.to(dtype)
    return out


def checksum(tensor):
    values = tensor.detach().cpu().numpy().astype(np.float64).reshape(-1)
    return float(np.sum(values)), float(np.sum(np.abs(values)))


def verify(tensors, weights_table):
    """Keys whose tensor is missing or whose checksums differ from the table's."""
    bad = []
    for key, entry in weights_table["keys"].items():
        if key not in tensors:
            bad.append(key)
            continue
        if entry["dtype"] == "int64":
            if int(tensors[key].abs().sum()) != 0:
                bad.append(key)
            continue
        total, abs_total = checksum(tensors[key].to(torch.float32))
        if total != entry["sum"] or abs_total != entry["abs_sum"]:
            bad.append(key)
    return bad
