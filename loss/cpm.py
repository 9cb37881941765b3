"""Center-guided pair mining (CPM), the cross-modality pair loss CMFN keeps from DEEN.

``cpm_loss(feat [4B, D], labels [4B], margin=0.2) -> scalar``. The rows are four blocks of
B: ``[V0; I0; Vk; Ik]`` (visible and infrared rows of the original copy, then of MBUE
branch k), with labels ``[l_v; l_i; l_v; l_i]``. Every block is reduced to one centre per
identity (the mean of that identity's rows in the block). With d the Euclidean distance and
sg a stop-gradient, for each identity i:

* first half: ``relu(d(I0_i, Vk_i) - sg[d(V0_i, Vk_i)] + m)`` plus half of
  ``relu(d(I0_i, Vk_i) - min_j d(Vk_i, Vk_j) + m) + relu(d(I0_i, Vk_i) - min_j d(V0_i, V0_j) + m)``
  (j over the other identities);
* second half: the same with V and I swapped: ``d(V0_i, Ik_i)``, ``sg[d(I0_i, Ik_i)]``, the
  minima within Ik and within I0.

Each relu term is averaged over identities; the loss is (first half + second half) / 2.
Values and gradients equal the released ``CPMLoss`` (which hard-codes m = 0.2, the default
here). The released code reduces each block by consecutive runs of rows; grouping by label
gives the same centres for the sampler's layout and does not depend on the row order.
"""
import torch
import torch.nn.functional as F

from loss.distances import identity_centres, pairwise_euclidean


def _paired(a, b):
    """d(a_i, b_i) for centres of the same identity (the diagonal of the distance matrix)."""
    return pairwise_euclidean(a, b).diagonal()


def _nearest_other(c):
    """min over j != i of d(c_i, c_j)."""
    dist = pairwise_euclidean(c, c)
    eye = torch.eye(len(c), dtype=torch.bool, device=c.device)
    return dist.masked_fill(eye, float("inf")).min(dim=1).values


def cpm_loss(feat, labels, margin=0.2):
    if feat.shape[0] % 4 or feat.shape[0] != labels.shape[0]:
        raise ValueError(
            "CPM expects [4B, D] features with 4B labels (blocks V0, I0, Vk, Ik), got %s and %s"
            % (tuple(feat.shape), tuple(labels.shape))
        )
    b = feat.shape[0] // 4
    # one centre per (block, identity): shift each block's labels into a range of its own
    stride = labels.max() + 1
    block = torch.arange(4, device=labels.device).repeat_interleave(b)
    centres, keys, _ = identity_centres(feat, block * stride + labels)
    ids = (keys % stride).view(4, -1) if len(keys) % 4 == 0 else None
    if ids is None or not bool((ids == ids[0]).all()):
        raise ValueError("CPM needs the same identities in each of its four blocks (V0, I0, Vk, Ik)")
    num_ids = ids.shape[1]
    v0, i0, vk, ik = centres.view(4, num_ids, -1).unbind(0)

    ap_v = _paired(i0, vk)
    an_v = _paired(v0, vk).detach()
    first = F.relu(ap_v - an_v + margin).mean() + 0.5 * (
        F.relu(ap_v - _nearest_other(vk) + margin).mean() + F.relu(ap_v - _nearest_other(v0) + margin).mean()
    )
    ap_i = _paired(v0, ik)
    an_i = _paired(i0, ik).detach()
    second = F.relu(ap_i - an_i + margin).mean() + 0.5 * (
        F.relu(ap_i - _nearest_other(ik) + margin).mean() + F.relu(ap_i - _nearest_other(i0) + margin).mean()
    )
    return (first + second) / 2
