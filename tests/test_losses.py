"""Losses against the released reference (tests/golden/losses.pt), loop references and hand
computations; the CMFN criterion (``criterion(outputs, batch, epoch) -> (total, terms, info)``
on paired batches): its weights, DCL schedule, 1-copy path, autocast, the registry and the
output check against the models."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from loss import CRITERIA, build_criterion, check_outputs, cpm_loss, dcl_loss, identity_loss, triplet_loss
from loss.cmfn import CMFNCriterion, dcl_weight_at
from loss.orthogonality import orthogonality_loss
from model.registry import MODELS
from utils.config import ConfigError, build_config, get_default_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "losses.pt")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def golden():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.load(GOLDEN, weights_only=True)


def _blocks(f):
    return f.chunk(3, 0)


# the released call layout (train.py), see tests/golden/README.md "losses.pt"
CASES = {
    "tri": lambda f, i: triplet_loss(f, i["labels"], 0.3),
    "cpm_1": lambda f, i: cpm_loss(torch.cat([_blocks(f)[0], _blocks(f)[1]]), i["labs"], 0.2),
    "cpm_2": lambda f, i: cpm_loss(torch.cat([_blocks(f)[0], _blocks(f)[2]]), i["labs"], 0.2),
    "dcl_0": lambda f, i: dcl_loss(_blocks(f)[0], i["lab"]),
    "dcl_1": lambda f, i: dcl_loss(_blocks(f)[1], i["lab"]),
    "dcl_2": lambda f, i: dcl_loss(_blocks(f)[2], i["lab"]),
    "ort": lambda f, i: orthogonality_loss(f),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_value_and_gradient(golden, name):
    inputs = golden["inputs"]
    feat = inputs["feat"].clone().requires_grad_(True)
    value = CASES[name](feat, inputs)
    value.backward()
    assert torch.allclose(value.detach(), golden["outputs_eval"][name], rtol=RTOL, atol=ATOL)
    assert torch.allclose(feat.grad, golden["grads"][name], rtol=RTOL, atol=ATOL)


def test_orthogonality_against_hand_computation():
    # copies of m = 2 rows: orig [[9, 9], [9, 9]], branch1 [[1, 2], [0, 3]], branch2 [[4, 0], [5, 1]]
    pool = torch.tensor([[9.0, 9], [9, 9], [1, 2], [0, 3], [4, 0], [5, 1]])
    # (1*4 + 2*0) + (0*5 + 3*1) = 7, over all 6 rows; the original copy does not enter
    assert orthogonality_loss(pool).item() == pytest.approx(7 / 6)


def test_orthogonality_needs_three_equal_copies():
    with pytest.raises(ValueError, match="7 rows"):
        orthogonality_loss(torch.ones(7, 2))
    with pytest.raises(ValueError, match="num_copies=1"):
        orthogonality_loss(torch.ones(6, 2), num_copies=1)


def test_orthogonality_sums_in_float32_under_autocast():
    gen = torch.Generator().manual_seed(5)
    pool = torch.relu(torch.randn(3 * 16, 256, generator=gen)).bfloat16()
    exact = orthogonality_loss(pool.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = orthogonality_loss(pool)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(exact.item(), rel=1e-6)


def paired_batch(label_v, label_i):
    """The criterion's view of a paired batch: B visible rows, then the B infrared rows."""
    return {"pids": torch.cat([label_v, label_i]),
            "modality": torch.cat([torch.zeros_like(label_v), torch.ones_like(label_i)])}


def outputs(pool, logits, ort):
    return {"pool": pool, "logits": logits, "ort": ort}


def _golden_criterion_inputs(golden):
    """(model outputs, batch) of the golden features: 3 copies of 24 visible + 24 infrared rows."""
    inputs = golden["inputs"]
    feat = inputs["feat"].clone().requires_grad_(True)
    logits = torch.zeros(feat.shape[0], 400)
    return outputs(feat, logits, orthogonality_loss(feat)), paired_batch(inputs["label1"], inputs["label2"])


def test_logged_terms_keep_float64_precision():
    from loss.base import Criterion

    x = torch.tensor(1.0, dtype=torch.float64) + 2.0 ** -40
    terms = Criterion.as_floats({"a": x, "b": torch.tensor(0.1, dtype=torch.float32)}, x * 2)
    assert terms["a"] == 1.0 + 2.0 ** -40 and terms["total"] == 2.0 + 2.0 ** -39
    assert terms["b"] == float(torch.tensor(0.1, dtype=torch.float32))


def test_total_matches_golden(golden):
    cfg = get_default_config()
    cfg.LOSS.ID_WEIGHT = 0.0
    criterion = build_criterion(cfg)
    model_out, batch = _golden_criterion_inputs(golden)
    feat = model_out["pool"]
    total, terms, info = criterion(model_out, batch, 0)
    out, grads = golden["outputs_eval"], golden["grads"]
    assert torch.allclose(total.detach(), out["total_wo_id_c1_0.1"], rtol=RTOL, atol=ATOL)
    total.backward()
    expected = grads["tri"] + 0.8 * (grads["cpm_1"] + grads["cpm_2"]) + 0.01 * grads["ort"]
    expected = expected + 0.1 * (grads["dcl_0"] + grads["dcl_1"] + grads["dcl_2"])
    assert torch.allclose(feat.grad, expected, rtol=RTOL, atol=ATOL)
    assert info == {"dcl_weight": 0.1}
    assert set(terms) == {"id", "tri", "cpm", "ort", "dcl", "total"}
    assert terms["id"] == 0.0
    for key, ref in [("tri", out["tri"]), ("cpm", out["cpm_1"] + out["cpm_2"]), ("ort", out["ort"]),
                     ("dcl", out["dcl_sum"]), ("total", out["total_wo_id_c1_0.1"])]:
        assert isinstance(terms[key], float)
        assert math.isclose(terms[key], float(ref), rel_tol=RTOL, abs_tol=ATOL), key


def test_total_includes_identity_loss(golden):
    criterion = build_criterion(get_default_config())
    model_out, batch = _golden_criterion_inputs(golden)
    logits = torch.randn(model_out["pool"].shape[0], 400, generator=torch.Generator().manual_seed(0))
    total, terms, _ = criterion(dict(model_out, logits=logits), batch, 0)
    ce = F.cross_entropy(logits, batch["pids"].repeat(3))
    assert math.isclose(terms["id"], float(ce), rel_tol=1e-6)
    assert math.isclose(total.item(), float(golden["outputs_eval"]["total_wo_id_c1_0.1"] + ce), rel_tol=1e-5)


def test_label_smoothing_against_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    eps = 0.1
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        target = [eps / 3 + (1 - eps) * (k == y) for k in range(3)]
        expected += -sum(t * lp for t, lp in zip(target, log_p))
    expected /= 2
    assert math.isclose(float(identity_loss(logits, labels, eps)), expected, rel_tol=1e-6)
    plain = -sum(math.log(math.exp(r[y]) / sum(math.exp(v) for v in r)) for r, y in zip(logits.tolist(), [0, 1])) / 2
    assert math.isclose(float(identity_loss(logits, labels)), plain, rel_tol=1e-6)


def test_label_smoothing_is_read_from_config():
    cfg = get_default_config()
    cfg.LOSS.LABEL_SMOOTH = 0.1
    assert build_criterion(cfg).label_smooth == 0.1
    cfg.LOSS.LABEL_SMOOTH = 1.0
    with pytest.raises(ConfigError, match="LABEL_SMOOTH"):
        build_criterion(cfg)


def test_triplet_against_loop_reference():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 0])
    expected = 0.0
    for i in range(10):
        dists = [math.dist(feat[i].tolist(), feat[j].tolist()) for j in range(10)]
        pos = max(d for j, d in enumerate(dists) if labels[j] == labels[i])
        neg = min(d for j, d in enumerate(dists) if labels[j] != labels[i])
        expected += max(0.0, pos - neg + 0.3)
    assert math.isclose(float(triplet_loss(feat, labels, 0.3)), expected / 10, rel_tol=1e-6)


def test_dcl_against_loop_reference_on_uneven_layout():
    gen = torch.Generator().manual_seed(4)
    feat = torch.rand(11, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([5, 5, 5, 2, 2, 9, 9, 9, 9, 2, 5])
    rows = feat.tolist()
    positives, hard_means = [], []
    for pid in sorted(set(labels.tolist())):
        members = [r for r, l in zip(rows, labels.tolist()) if l == pid]
        centre = [sum(col) / len(members) for col in zip(*members)]
        dists = [(math.dist(centre, r), l == pid) for r, l in zip(rows, labels.tolist())]
        positives += [d for d, same in dists if same]
        negatives = [d for d, same in dists if not same]
        mean_neg = sum(negatives) / len(negatives)
        hard = [d for d in negatives if d < mean_neg]
        hard_means.append(sum(hard) / len(hard))
    expected = (sum(positives) / len(positives)) / (sum(hard_means) / len(hard_means))
    assert math.isclose(float(dcl_loss(feat, labels)), expected, rel_tol=1e-9)


def test_dcl_needs_two_identities():
    with pytest.raises(ValueError, match="two identities"):
        dcl_loss(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))


def test_cpm_rejects_mismatched_blocks():
    feat = torch.randn(16, 4)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 2, 2, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="same identities"):
        cpm_loss(feat, labels)


def test_dcl_schedule_by_epoch():
    sysu = build_config("sysu")
    weights = {e: dcl_weight_at(sysu.LOSS.CMFN.DCL_WEIGHTS, sysu.LOSS.CMFN.DCL_MILESTONES, e) for e in (0, 10, 11, 20, 21, 150)}
    assert weights == {0: 0.1, 10: 0.1, 11: 0.01, 20: 0.01, 21: 0.0, 150: 0.0}
    regdb = build_config("regdb")
    weights = {e: dcl_weight_at(regdb.LOSS.CMFN.DCL_WEIGHTS, regdb.LOSS.CMFN.DCL_MILESTONES, e) for e in (0, 5, 6, 150)}
    assert weights == {0: 0.1, 5: 0.1, 6: 0.01, 150: 0.01}


def test_dcl_is_skipped_when_its_weight_is_zero(golden):
    criterion = build_criterion(get_default_config())
    model_out, batch = _golden_criterion_inputs(golden)
    total_on, terms_on, info_on = criterion(model_out, batch, 11)
    total_off, terms_off, info_off = criterion(model_out, batch, 21)
    assert info_on["dcl_weight"] == 0.01 and info_off["dcl_weight"] == 0.0
    assert terms_off["dcl"] == 0.0
    assert math.isclose((total_on - total_off).item(), 0.01 * terms_on["dcl"], rel_tol=1e-4)


def test_bad_dcl_schedule_is_a_config_error():
    cfg = get_default_config()
    cfg.LOSS.CMFN.DCL_WEIGHTS = [0.1, 0.01]
    with pytest.raises(ConfigError, match="DCL_WEIGHTS"):
        build_criterion(cfg)
    cfg.LOSS.CMFN.DCL_WEIGHTS = [0.1, 0.01, 0.0]
    cfg.LOSS.CMFN.DCL_MILESTONES = [21, 11]
    with pytest.raises(ConfigError, match="DCL_MILESTONES must be increasing"):
        build_criterion(cfg)


def test_unknown_criterion_name_lists_the_known_ones():
    cfg = get_default_config()
    cfg.LOSS.NAME = "nope"
    with pytest.raises(ConfigError, match=r"LOSS\.NAME 'nope'.*known: .*cmfn"):
        build_criterion(cfg)
    assert "cmfn" in CRITERIA.names()
    assert CRITERIA.get("cmfn") is CMFNCriterion
    assert isinstance(build_criterion(get_default_config()), CMFNCriterion)
    with pytest.raises(ValueError, match="already registered"):
        CRITERIA.register("cmfn")(CMFNCriterion)


def test_cmfn_criterion_trains_cmfn_and_baseline_only():
    """The CMFN criterion's outputs are produced by CMFN and by its baseline (same recipe)."""
    criterion = build_criterion(get_default_config())
    assert set(criterion.required_outputs) == {"pool", "logits", "ort"}
    for name in ("cmfn", "baseline"):
        check_outputs(criterion, MODELS.get(name))
    with pytest.raises(ConfigError, match="ort"):
        check_outputs(criterion, MODELS.get("ivreid"))


def _random_batch(copies, b=8, num_ids=2, dim=16, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    label = torch.arange(num_ids).repeat_interleave(b // num_ids)
    feat = torch.relu(torch.randn(copies * 2 * b, dim, generator=gen))
    logits = torch.randn(copies * 2 * b, num_classes, generator=gen)
    return feat, logits, label


def test_single_copy_path():
    criterion = build_criterion(get_default_config())
    feat, logits, label = _random_batch(copies=1)
    total, terms, _ = criterion(outputs(feat, logits, torch.tensor(0.0)), paired_batch(label, label), 0)
    labels = torch.cat([label, label])
    expected = F.cross_entropy(logits, labels) + triplet_loss(feat, labels, 0.3) + 0.1 * dcl_loss(feat, labels)
    assert terms["cpm"] == 0.0 and terms["ort"] == 0.0
    assert math.isclose(float(total), float(expected), rel_tol=1e-6)
    assert math.isclose(terms["total"], float(expected), rel_tol=1e-6)


def test_row_count_must_match_labels():
    criterion = build_criterion(get_default_config())
    feat, logits, label = _random_batch(copies=1)
    batch = paired_batch(label, label)
    with pytest.raises(ValueError, match="pool has 15 rows"):
        criterion(outputs(feat[:-1], logits[:-1], 0.0), batch, 0)
    with pytest.raises(ValueError, match="logits have 15 rows"):
        criterion(outputs(feat, logits[:-1], 0.0), batch, 0)


def test_batch_must_be_paired():
    """B visible rows, then B infrared rows: any other modality layout is refused."""
    criterion = build_criterion(get_default_config())
    feat, logits, label = _random_batch(copies=1)
    out = outputs(feat, logits, 0.0)
    batch = paired_batch(label, label)
    for modality in (batch["modality"].flip(0), torch.zeros_like(batch["modality"]),
                     batch["modality"].roll(1)):
        with pytest.raises(ValueError, match="paired batches"):
            criterion(out, dict(batch, modality=modality), 0)
    odd = {"pids": batch["pids"][:-1], "modality": batch["modality"][:-1]}
    with pytest.raises(ValueError, match="paired batches"):
        criterion(outputs(feat[:-1], logits[:-1], 0.0), odd, 0)


def test_bf16_autocast_is_finite_and_close_to_fp32():
    criterion = build_criterion(get_default_config())
    feat, logits, label = _random_batch(copies=3, b=12, num_ids=3, dim=64)
    loss_ort = torch.tensor(1.5)
    batch = paired_batch(label, label)
    total32, terms32, _ = criterion(outputs(feat, logits, loss_ort), batch, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 inputs inside autocast: the distances are still computed in float32
        total_same, _, _ = criterion(outputs(feat, logits, loss_ort), batch, 0)
        feat16 = feat.bfloat16().requires_grad_(True)
        total16, terms16, _ = criterion(outputs(feat16, logits.bfloat16(), loss_ort.bfloat16()), batch, 0)
    assert torch.equal(total_same, total32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        standalone = [triplet_loss(feat, label.repeat(6), 0.3), dcl_loss(feat[:24], label.repeat(2))]
    assert torch.equal(standalone[0], triplet_loss(feat, label.repeat(6), 0.3))
    assert torch.equal(standalone[1], dcl_loss(feat[:24], label.repeat(2)))
    assert total16.dtype == torch.float32 and torch.isfinite(total16)
    total16.backward()
    assert torch.isfinite(feat16.grad.float()).all()
    for key in ("id", "tri", "cpm", "dcl", "total"):
        assert math.isclose(terms16[key], terms32[key], rel_tol=2e-2, abs_tol=1e-3), key
