"""Orthogonality loss between the two MBUE branches (spec training_recipe.md 3.4, "Ort").

The model computes it in its forward (it owns the pooled branch features);
``orthogonality(feat_br1 [B', D], feat_br2 [B', D], num_rows) -> scalar`` is the same
quantity, ``sum_r <feat_br1[r], feat_br2[r]> / num_rows``, where the released code divides
by the number of rows of ALL copies together (3 * B', not B'). It is unnormalised and
non-negative for post-ReLU features.
"""
from loss.distances import full_precision


def orthogonality(feat_br1, feat_br2, num_rows):
    if feat_br1.shape != feat_br2.shape:
        raise ValueError(
            "orthogonality expects two equal-shape branch features, got %s and %s"
            % (tuple(feat_br1.shape), tuple(feat_br2.shape))
        )
    return (full_precision(feat_br1) * full_precision(feat_br2)).sum() / num_rows
