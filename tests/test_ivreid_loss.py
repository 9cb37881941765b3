"""The IV-REID criterion against the released training step (tests/golden/ivreid/losses_*.pt):
every term, the total and its gradients; the summation order, the weights, the triplet
feature, row-order invariance, autocast, and the missing-modality error."""
import os
import warnings

import pytest
import torch

from loss.ivreid import IVReIDCriterion
from loss.registry import CRITERIA
from model.ivreid import ModalityClassifier
from utils.config import get_default_config, merge_from_list

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ivreid")
RTOL, ATOL = 1e-5, 2e-5
# the released dataset settings: KL reduction and triplet margin
SETTINGS = {"sysu": ("batchmean", 0.3), "regdb": ("mean", 0.2)}
# criterion term -> released term
TERMS = {"kl_visible": "kl_rgb", "kl_infrared": "kl_ir", "id": "id_shared", "id_visible": "id_rgb",
         "id_infrared": "id_ir", "tri": "triplet", "total": "total"}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def golden(request):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = torch.load(os.path.join(GOLDEN, "losses_%s.pt" % request.param), weights_only=True)
    return request.param, data


def _criterion(dataset, *opts):
    """The criterion with the released dataset settings, then the KEY VALUE overrides `opts`."""
    cfg = get_default_config()
    cfg.LOSS.IVREID.KL_REDUCTION, cfg.LOSS.TRI_MARGIN = SETTINGS[dataset]
    merge_from_list(cfg, list(opts))
    return IVReIDCriterion(cfg)


def _modality(data):
    """The released rows: 0 for the visible (RGB) rows of the split, 1 for the infrared ones."""
    modality = torch.zeros(len(data["inputs"]["pids"]), dtype=torch.int64)
    modality[data["split"]["ir"]] = 1
    return modality


def _aux_head(state_dict, prefix):
    """The model's auxiliary head loaded with the released head `prefix` (``rgb`` or ``ir``:
    keys ``<prefix>_bn.*``, ``<prefix>_fc1.*``, ``<prefix>_fc2.*``), in train mode."""
    fc1, fc2 = state_dict[prefix + "_fc1.weight"], state_dict[prefix + "_fc2.weight"]
    head = ModalityClassifier(fc1.shape[1], fc1.shape[0], fc2.shape[0])
    head.load_state_dict({k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + "_")})
    return head.train()


def _leaves(data, through_heads=False):
    """The released model outputs as leaves (``cls_score``, ``feat``, ``aux_rgb_score``,
    ``aux_ir_score``); with `through_heads` the two auxiliary scores are recomputed from the
    leaf feat by the model's heads holding the released weights (so the gradient reaches
    feat through them; their .grad is retained)."""
    train = data["outputs_train"]
    names = ("cls_score", "feat") if through_heads else ("cls_score", "feat", "aux_rgb_score", "aux_ir_score")
    leaves = {k: train[k].clone().requires_grad_(True) for k in names}
    if through_heads:
        for name, prefix in (("aux_rgb_score", "rgb"), ("aux_ir_score", "ir")):
            leaves[name] = _aux_head(data["state_dict"], prefix)(leaves["feat"])
            leaves[name].retain_grad()
    return leaves


def _outputs(t):
    """The model's output dict for released tensors `t`; ``pool`` is zeros unless given."""
    return {"logits": t["cls_score"], "feat": t["feat"], "pool": t.get("pool", torch.zeros_like(t["feat"])),
            "aux_logits_visible": t["aux_rgb_score"], "aux_logits_infrared": t["aux_ir_score"]}


def _batch(data):
    return {"pids": data["inputs"]["pids"], "modality": _modality(data)}


def test_registered_with_its_outputs():
    assert CRITERIA.get("ivreid") is IVReIDCriterion
    assert set(IVReIDCriterion.required_outputs) == {"feat", "pool", "logits", "aux_logits_visible",
                                                     "aux_logits_infrared"}


def test_terms_total_and_gradients_match_the_released_step(golden):
    dataset, data = golden
    leaves = _leaves(data, through_heads=True)
    for name in ("aux_rgb_score", "aux_ir_score"):
        assert torch.allclose(leaves[name], data["outputs_train"][name], rtol=RTOL, atol=ATOL), name
    total, terms, info = _criterion(dataset)(_outputs(leaves), _batch(data), epoch=0)
    assert info == {} and set(terms) == set(TERMS)
    for mine, theirs in TERMS.items():
        assert terms[mine] == pytest.approx(float(data["terms"][theirs]), rel=RTOL, abs=ATOL), mine
    assert terms["total"] == total.item()
    total.backward()
    for name, grad in data["total_grads"].items():
        assert torch.allclose(leaves[name].grad, grad, rtol=RTOL, atol=ATOL), name


def test_total_is_summed_in_the_released_order(golden):
    # With the released logits as inputs every term is the released float32 value; the total
    # must then be the float32 sum (kl_rgb + kl_ir) + ((id_shared + id_rgb) + id_ir) + triplet.
    dataset, data = golden
    total, terms, _ = _criterion(dataset)(_outputs(_leaves(data)), _batch(data), epoch=0)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in terms.items()}
    released = (t["kl_visible"] + t["kl_infrared"]) + ((t["id"] + t["id_visible"]) + t["id_infrared"]) + t["tri"]
    assert total.dtype == torch.float32 and torch.equal(total.detach(), released)
    assert total.item() == pytest.approx(float(data["terms"]["total"]), rel=RTOL)


def test_mean_reduction_is_batchmean_over_classes_without_warnings(golden):
    dataset, data = golden
    outputs = _outputs(_leaves(data))
    classes = data["outputs_train"]["aux_rgb_score"].shape[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, mean, _ = _criterion(dataset, "LOSS.IVREID.KL_REDUCTION", "mean")(outputs, _batch(data), 0)
    assert not caught
    _, batchmean, _ = _criterion(dataset, "LOSS.IVREID.KL_REDUCTION", "batchmean")(outputs, _batch(data), 0)
    for name in ("kl_visible", "kl_infrared"):
        assert mean[name] == pytest.approx(batchmean[name] / classes, rel=1e-6)


def test_weights_scale_their_terms(golden):
    dataset, data = golden
    weights = ["LOSS.ID_WEIGHT", "0.25", "LOSS.TRI_WEIGHT", "3.0", "LOSS.IVREID.KL_WEIGHT", "0.5",
               "LOSS.IVREID.AUX_ID_WEIGHT", "2.0"]
    total, terms, _ = _criterion(dataset, *weights)(_outputs(_leaves(data)), _batch(data), 0)
    g = {k: float(data["terms"][v]) for k, v in TERMS.items()}
    expected = (0.5 * (g["kl_visible"] + g["kl_infrared"]) + 0.25 * g["id"]
                + 2.0 * (g["id_visible"] + g["id_infrared"]) + 3.0 * g["tri"])
    assert total.item() == pytest.approx(expected, rel=RTOL)
    for mine, theirs in TERMS.items():
        if mine != "total":  # the logged terms stay unweighted
            assert terms[mine] == pytest.approx(float(data["terms"][theirs]), rel=RTOL), mine


def test_triplet_feature_pool_reads_the_pool_output(golden):
    dataset, data = golden
    t = _leaves(data)
    t["pool"], t["feat"] = t["feat"], torch.zeros_like(t["feat"])
    _, terms, _ = _criterion(dataset, "LOSS.IVREID.TRI_FEATURE", "pool")(_outputs(t), _batch(data), 0)
    assert terms["tri"] == pytest.approx(float(data["terms"]["triplet"]), rel=RTOL)


def test_invariant_to_row_order_given_the_modality_labels(golden):
    dataset, data = golden
    leaves, batch = _leaves(data), _batch(data)
    total, terms, _ = _criterion(dataset)(_outputs(leaves), batch, 0)
    total.backward()
    perm = torch.randperm(len(batch["pids"]), generator=torch.Generator().manual_seed(0))
    shuffled = {k: v.detach()[perm].requires_grad_(True) for k, v in leaves.items()}
    total_p, terms_p, _ = _criterion(dataset)(_outputs(shuffled), {k: v[perm] for k, v in batch.items()}, 0)
    total_p.backward()
    assert terms_p == pytest.approx(terms, rel=1e-6)
    for name in shuffled:
        assert torch.allclose(shuffled[name].grad, leaves[name].grad[perm], rtol=1e-5, atol=1e-7), name


def test_float32_under_autocast(golden):
    dataset, data = golden
    low = {k: v.detach().bfloat16() for k, v in _outputs(_leaves(data)).items()}
    upcast = {k: v.float() for k, v in low.items()}
    _, expected, _ = _criterion(dataset)(upcast, _batch(data), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms, _ = _criterion(dataset)(low, _batch(data), 0)
    assert total.dtype == torch.float32
    assert terms == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fill, message", [(1, "has 0 visible and 64 infrared"), (0, "64 visible and 0 infrared"),
                                           (2, "must be 0")])
def test_a_batch_without_both_modalities_is_refused(golden, fill, message):
    dataset, data = golden
    outputs = _outputs(_leaves(data))
    batch = {"pids": data["inputs"]["pids"], "modality": torch.full_like(data["inputs"]["pids"], fill)}
    with pytest.raises(ValueError, match=message):
        _criterion(dataset)(outputs, batch, 0)
