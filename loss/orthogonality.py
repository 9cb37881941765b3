"""Orthogonality loss ("Ort") between the two MBUE branches of CMFN.

``orthogonality_loss(pool [num_copies * m, D], num_copies=3) -> 0-d tensor``: ``pool`` holds
the pre-BN pooled features of the copies in blocks of m rows, [orig; branch1; branch2]; the
loss is ``sum_r <branch1[r], branch2[r]>`` divided by the number of rows of all copies
together (``num_copies * m``: 144 for the released batch of 24 visible + 24 infrared images),
not by m, because that is how the released code divides. It is not normalised, and it is
non-negative for the post-ReLU features the model pools.
The model computes it in its training forward (it owns the pooled branch features) and the
criterion weights it by LOSS.CMFN.ORT_WEIGHT (released 0.01).

The products are summed in float32 (float64 stays float64), so a bf16/fp16 ``pool`` from an
autocast forward does not lose the sum to rounding.
"""
from loss.distances import full_precision


def orthogonality_loss(pool, num_copies=3):
    rows = pool.shape[0]
    if num_copies < 3 or rows % num_copies:
        raise ValueError(
            "orthogonality_loss needs the rows of at least 3 copies [orig; branch1; branch2] in equal "
            "blocks, got %d rows for num_copies=%r" % (rows, num_copies)
        )
    m = rows // num_copies
    pool = full_precision(pool)
    return (pool[m:2 * m] * pool[2 * m:3 * m]).sum() / rows
