"""One IV-REID training iteration against the reference's own (tests/golden/ivreid/train_step_*.pt).

The golden files record one iteration of the released training scripts (SYSU: KL reduction
``batchmean``, triplet margin 0.3; RegDB: ``mean``, 0.2) on the full network (ResNet-50,
16 identities) and 8 images of 384x128: the loss terms, the gradients of the total w.r.t.
the network outputs, the parameter gradients, the Adam settings and the parameters after
the step, in float32 and (``*_f64``) in float64. Here the same iteration runs with this
project's parts:

* the model of the ``ivreid`` preset of the dataset (``build_model``, ImageNet loading off,
  C = 16), holding the weights of the README rule generated under the reference's key
  names and mapped onto this project's keys by the checkpoint converter's key mapping;
* the batch in this project's paired layout: the reference's visible rows (``split.rgb``)
  first, then its infrared rows (``split.ir``), which pair up by identity; row j here is
  reference row ``ORDER[j]``. Train-mode BatchNorm, the identity losses and the batch-hard
  triplet do not depend on the row order, so only float summation orders differ;
* ``loss.build_criterion(cfg)``, ``engine.solver.build_optimizer(cfg, model)``, then one
  ``zero_grad``, forward, ``total.backward()``, ``step()``.

SYSU runs in float64 (the reference's float64 run is reproduced to ~1e-14; float32 train
mode through 8-image BatchNorm statistics leaves the backbone gradients only ~1 % accurate),
RegDB in float32 against the float32 golden values. The forward pass of both files is the
same (same weights and images), so RegDB's float64 terms and output gradients are also
checked on SYSU's float64 forward. Tolerances are the README's recommendations; dead tensors
(every conv bias and the stem BN bias, whose gradients vanish analytically because a
train-mode BatchNorm follows) must have |g| < 1e-10 in float64.

The golden files were made at 1 intra-op thread; the steps here run at 1 thread too.
"""
import re

import pytest
import torch

from engine.solver import build_optimizer
from ivreid_golden import digest, golden, rule_images, rule_reference_state
from loss import build_criterion
from model import build_model
from model.ivreid_convert import map_reference_state_dict, project_key
from utils.config import build_config

# reference term name -> this project's term name
TERMS = {"kl_rgb": "kl_visible", "kl_ir": "kl_infrared", "id_shared": "id", "id_rgb": "id_visible",
         "id_ir": "id_infrared", "triplet": "tri", "total": "total"}
# reference output name -> this project's output name
OUTPUTS = {"cls_score": "logits", "feat": "feat", "aux_rgb_score": "aux_logits_visible",
           "aux_ir_score": "aux_logits_infrared"}
# Conv biases (stem, block and shortcut convs) and the stem BN bias: a train-mode BN follows
# each (the stem BN through the max pool and 1x1 convs), so their gradients are 0.
DEAD = re.compile(r"^base\.(?:.*\.)?(?:conv\d\.bias|downsample\.0\.bias)$|^base\.bn1\.bias$")
NUM_CLASSES = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cases():
    return {"sysu": golden("train_step_sysu.pt"), "regdb": golden("train_step_regdb.pt")}


def reference_key(digest_key, aux):
    """The reference state-dict key of a golden entry (auxiliary entries lack ``ide_net.``)."""
    return "ide_net." + digest_key if aux else digest_key


@pytest.fixture(scope="module")
def rule():
    forward = golden("model_forward.pt")
    reference = rule_reference_state(forward["state_dict_keys"], forward["aux_state_dict_keys"])
    mapped, folded = map_reference_state_dict(reference)
    assert folded == 0
    return reference, mapped, rule_images()


def order(case):
    """Reference row numbers in this project's row order: visible rows, then infrared rows."""
    return torch.cat([case["split"]["rgb"], case["split"]["ir"]])


def project_batch(case, images):
    rows = order(case)
    pids = case["inputs"]["pids"][rows]
    half = len(rows) // 2
    modality = torch.tensor([0] * half + [1] * half)
    return {"images": images[rows], "pids": pids, "camids": torch.where(modality == 0, 1, 3),
            "modality": modality, "index": torch.arange(len(rows))}


def train_step(dataset, dtype, mapped, images, case, also=()):
    """One iteration with this project's parts; `also`: datasets whose criterion is also
    evaluated (terms, gradients w.r.t. the outputs) on this forward pass."""
    cfg = build_config(dataset, method="ivreid", opts=["MODEL.PRETRAINED", "False"])
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    model.load_state_dict(mapped)
    model.to(dtype).train()
    batch = project_batch(case, images.to(dtype))
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(cfg, model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    optimizer.zero_grad()
    outputs = model(batch["images"], batch["modality"], batch["camids"])
    extra = {}
    for other in also:
        # before retain_grad: autograd.grad would also accumulate into the retained .grad
        other_total, other_terms, _ = build_criterion(build_config(other, method="ivreid"))(outputs, batch, 0)
        grads = torch.autograd.grad(other_total, [outputs[n] for n in OUTPUTS.values()], retain_graph=True)
        extra[other] = {"total": other_total.detach(), "terms": other_terms,
                        "total_grads": dict(zip(OUTPUTS.values(), grads))}
    for name in OUTPUTS.values():
        outputs[name].retain_grad()
    total, terms, _ = criterion(outputs, batch, 0)
    total.backward()
    param_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    optimizer.step()
    return {
        "cfg": cfg, "model": model, "optimizer": optimizer, "batch": batch, "total": total, "terms": terms,
        "outputs": {k: v.detach() for k, v in outputs.items()},
        "total_grads": {k: outputs[k].grad.detach() for k in OUTPUTS.values()},
        "param_grads": param_grads, "before": before,
        "after": {k: v.detach().clone() for k, v in model.state_dict().items()}, "extra": extra,
    }


@pytest.fixture(scope="module")
def sysu64(rule, cases):
    _, mapped, images = rule
    return train_step("sysu", torch.float64, mapped, images, cases["sysu"], also=("regdb",))


@pytest.fixture(scope="module")
def regdb32(rule, cases):
    _, mapped, images = rule
    return train_step("regdb", torch.float32, mapped, images, cases["regdb"])


def close(got, expected, rtol, atol, what):
    assert got.shape == expected.shape, what
    gap = (got - expected.to(got.dtype)).abs().max().item()
    assert torch.allclose(got, expected.to(got.dtype), rtol=rtol, atol=atol), "%s: max gap %.3g" % (what, gap)


# --- the batch and the forward pass ---------------------------------------------------------

def test_golden_batch_and_project_layout(rule, cases):
    _, _, images = rule
    stats, head = digest([images])
    for dataset, case in cases.items():
        assert torch.allclose(stats[0], case["inputs_digest"]["images"]["stats"], rtol=1e-12, atol=0), dataset
        assert torch.equal(head[0], case["inputs_digest"]["images"]["head"]), dataset
        batch = project_batch(case, images)
        # pairs aligned by identity: visible row k and infrared row k show the same person
        assert torch.equal(batch["pids"][:4], batch["pids"][4:])
        assert batch["pids"].tolist() == [3, 3, 11, 11, 3, 3, 11, 11]
        assert sorted(order(case).tolist()) == list(range(8))
    # both files ran the same network on the same images
    for name, value in cases["sysu"]["outputs_train"].items():
        assert torch.equal(value, cases["regdb"]["outputs_train"][name]), name


def test_forward_outputs(cases, sysu64, regdb32):
    for run, case in ((sysu64, cases["sysu"]), (regdb32, cases["regdb"])):
        rows = order(case)
        expected = case["outputs_train"]
        # train-mode float32 tolerances of the README (feat 2e-3, scores 5e-4)
        for theirs, ours in OUTPUTS.items():
            close(run["outputs"][ours].double(), expected[theirs][rows].double(), 0, 2e-3 if ours == "feat" else 5e-4,
                  theirs)


# --- loss terms and gradients w.r.t. the outputs ------------------------------------------

def check_float64_terms(total, terms, case):
    """The float64 total to 1e-10; the logged terms, which the criterion reports as float32
    numbers, to float32 rounding (2^-24 relative) of the float64 values."""
    assert total.dtype == torch.float64
    assert total.item() == pytest.approx(case["terms_f64"]["total"].item(), rel=1e-10)
    for theirs, ours in TERMS.items():
        assert terms[ours] == pytest.approx(case["terms_f64"][theirs].item(), rel=1e-7), theirs


def test_terms_sysu_float64(cases, sysu64):
    check_float64_terms(sysu64["total"], sysu64["terms"], cases["sysu"])


def test_terms_regdb_float32(cases, regdb32):
    case = cases["regdb"]
    assert regdb32["total"].dtype == torch.float32
    for theirs, ours in TERMS.items():
        assert regdb32["terms"][ours] == pytest.approx(case["terms"][theirs].item(), rel=1e-5), theirs


def test_terms_regdb_float64_on_the_shared_forward(cases, sysu64):
    # The RegDB criterion on SYSU's float64 forward pass (the same network and images).
    case, extra = cases["regdb"], sysu64["extra"]["regdb"]
    check_float64_terms(extra["total"], extra["terms"], case)
    rows = order(case)
    for theirs, ours in OUTPUTS.items():
        expected = case["total_grads_f64"][theirs][rows]
        close(extra["total_grads"][ours], expected, 1e-8, 1e-12 * expected.abs().max().item(), theirs)


def test_output_gradients(cases, sysu64, regdb32):
    case, rows = cases["sysu"], order(cases["sysu"])
    for theirs, ours in OUTPUTS.items():
        expected = case["total_grads_f64"][theirs][rows]
        assert sysu64["total_grads"][ours].dtype == torch.float64
        close(sysu64["total_grads"][ours], expected, 1e-8, 1e-12 * expected.abs().max().item(), theirs)
    # float32: rtol 1e-4, atol 1e-5 x the largest output gradient of the README's table (0.77);
    # the feat gradient carries the float32 noise of the 8-image train-mode BN (~5e-6)
    case, rows = cases["regdb"], order(cases["regdb"])
    for theirs, ours in OUTPUTS.items():
        close(regdb32["total_grads"][ours], case["total_grads"][theirs][rows], 1e-4, 1e-5 * 0.77, theirs)


# --- parameter gradients ------------------------------------------------------------------

def digest_rows(table, aux):
    """(reference key, row number) of a digest table, auxiliary keys prefixed."""
    return [(reference_key(k, aux), i) for i, k in enumerate(table["keys"])]


def test_parameter_gradients_float64(cases, sysu64):
    case, grads = cases["sysu"], sysu64["param_grads"]
    listed = []
    for table, aux in ((case["param_grad_digest_f64"], False), (case["aux_param_grad_digest_f64"], True)):
        for key, i in digest_rows(table, aux):
            listed.append(project_key(key))
            g = grads[project_key(key)]
            assert g.dtype == torch.float64 and g.numel() == table["numel"][i].item(), key
            if DEAD.match(key):
                assert g.abs().max().item() < 1e-10, key
                assert table["stats"][i, 1].item() < 1e-10 * g.numel(), key
                continue
            stats, head = digest([g])
            expected = table["stats"][i]
            # sum |g| and sum g^2 to rtol 1e-8; the signed sum relative to sum |g|
            assert torch.allclose(stats[0, 1:], expected[1:], rtol=1e-8, atol=0), key
            assert abs(stats[0, 0].item() - expected[0].item()) <= 1e-8 * expected[1].item(), key
            n = min(8, g.numel())
            close(head[0, :n], table["head"][i, :n], 1e-8, 1e-10 * g.abs().max().item(), key)
    # every trainable tensor, nothing else, has a gradient
    assert sorted(listed) == sorted(grads)
    assert len(listed) == 216 + 12
    for subset, aux in ((case["param_grads_subset_f64"], False), (case["aux_param_grads_subset_f64"], True)):
        for key, expected in subset.items():
            key = reference_key(key, aux)
            if DEAD.match(key):
                assert grads[project_key(key)].abs().max().item() < 1e-10, key
            else:
                close(grads[project_key(key)], expected, 1e-8, 1e-10 * expected.abs().max().item(), key)


def test_parameter_gradients_float32_relative_norms(cases, regdb32):
    case, grads = cases["regdb"], regdb32["param_grads"]
    for subset, aux in ((case["param_grads_subset"], False), (case["aux_param_grads_subset"], True)):
        for key, expected in subset.items():
            key = reference_key(key, aux)
            if DEAD.match(key):
                continue  # float32 noise (~1e-5) around an exact 0
            g = grads[project_key(key)].double()
            assert ((g - expected.double()).norm() / expected.double().norm()).item() < 5e-2, key
    # the norms of every live tensor, from the digests' sum g^2
    for table, aux in ((case["param_grad_digest"], False), (case["aux_param_grad_digest"], True)):
        for key, i in digest_rows(table, aux):
            if not DEAD.match(key):
                norm = grads[project_key(key)].double().norm().item()
                assert norm == pytest.approx(table["stats"][i, 2].sqrt().item(), rel=5e-2), key


# --- the optimizer and the step -----------------------------------------------------------

@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_adam_settings(cases, sysu64, regdb32, dataset):
    run, reference = {"sysu": sysu64, "regdb": regdb32}[dataset], cases[dataset]["optimizers"]
    optimizer, model = run["optimizer"], run["model"]
    assert type(optimizer) is torch.optim.Adam
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["main", "aux_heads"]
    aux = {id(p) for name in ("aux_visible", "aux_infrared") for p in getattr(model, name).parameters()}
    assert {id(p) for p in groups["aux_heads"]["params"]} == aux
    assert {id(p) for g in groups.values() for p in g["params"]} == {id(p) for p in model.parameters()}
    for name, released in (("main", reference["backbone"]), ("aux_heads", reference["head"])):
        group = groups[name]
        # the reference makes one group per tensor
        assert len(group["params"]) == released["num_param_groups"], name
        for key in ("lr", "weight_decay", "eps"):
            assert type(group[key]) is float and group[key] == pytest.approx(released[key], rel=1e-12), (name, key)
        assert list(group["betas"]) == released["betas"], name
        assert all(type(b) is float for b in group["betas"]), name
        assert group["amsgrad"] == released["amsgrad"] and group["maximize"] == released["maximize"], name
    assert groups["main"]["lr"] == pytest.approx(1e-4, rel=1e-12)
    assert groups["aux_heads"]["lr"] == pytest.approx(1e-3, rel=1e-12)


def group_lrs(run):
    return {id(p): g["lr"] for g in run["optimizer"].param_groups for p in g["params"]}


def adam_first_step(before, grad, lr, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8):
    """The first Adam step with coupled L2 decay, written out: m and v from zero, bias-corrected."""
    g = grad + weight_decay * before
    m, v = (1 - betas[0]) * g, (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0]), v / (1 - betas[1])
    return before - lr * m_hat / (v_hat.sqrt() + eps)


def check_moves(key, got_delta, expected_delta, lr):
    """README rule: |after - before| gaps within 2.05 lr, all but < 1 % of them within 1e-6."""
    gap = (got_delta - expected_delta.to(got_delta.dtype)).abs()
    assert gap.max().item() <= 2.05 * lr, key
    return int((gap > 1e-6).sum()), gap.numel()


@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_parameters_after_the_step(rule, cases, sysu64, regdb32, dataset):
    reference, _, _ = rule
    run, case = {"sysu": sysu64, "regdb": regdb32}[dataset], cases[dataset]
    suffix = "_f64" if dataset == "sysu" else ""
    lrs, params = group_lrs(run), dict(run["model"].named_parameters())
    off = total = 0
    subsets = ((case["params_after_subset" + suffix], False), (case["aux_params_after_subset" + suffix], True))
    for subset, aux in subsets:
        for key, expected in subset.items():
            key = reference_key(key, aux)
            ours = project_key(key)
            got = run["after"][ours]
            if ours in params:
                bad, n = check_moves(key, got - run["before"][ours], expected - reference[key],
                                     lrs[id(params[ours])])
                off, total = off + bad, total + n
            elif key.endswith("num_batches_tracked"):
                assert got.item() == expected.item() == 1, key
            else:  # BN running statistics after the one train forward
                rtol, atol = (1e-8, 1e-12) if dataset == "sysu" else (1e-5, 2e-5)
                close(got.double(), expected.double(), rtol, atol, key)
    assert total > 28000 and off < 0.01 * total, (off, total)


@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_the_step_is_adam_on_our_gradients(sysu64, regdb32, dataset):
    run = {"sysu": sysu64, "regdb": regdb32}[dataset]
    lrs = group_lrs(run)
    for key, p in run["model"].named_parameters():
        before, grad, after = run["before"][key].double(), run["param_grads"][key].double(), run["after"][key].double()
        lr = lrs[id(p)]
        expected = adam_first_step(before, grad, lr)
        # the rounding of the stored result and of the step, a few units in the last place
        unit = torch.finfo(p.dtype).eps
        atol = 2 * unit * torch.maximum(before.abs(), after.abs()) + 4 * unit * lr
        assert ((after - expected).abs() <= atol).all(), key
        assert (after != before).any(), key


def test_buffers_after_the_step_regdb_float32(rule, cases, regdb32):
    """Every BN buffer after the one train forward against the delta digests (all 378
    reference entries: parameters as the sum of |after - before|, buffers by value)."""
    reference, _, _ = rule
    case = cases["regdb"]
    params = dict(regdb32["model"].named_parameters())
    for table, aux in ((case["delta_digest"], False), (case["aux_delta_digest"], True)):
        assert len(table["keys"]) == (18 if aux else 378)
        for key, i in digest_rows(table, aux):
            ours = project_key(key)
            delta = regdb32["after"][ours].double() - reference[key].double()
            stats, _ = digest([delta])
            if ours in params:
                # ~lr per element whichever way it moves
                assert stats[0, 1].item() == pytest.approx(table["stats"][i, 1].item(), rel=1e-2), key
            elif key.endswith("num_batches_tracked"):
                assert delta.item() == table["stats"][i, 0].item() == 1, key
            else:
                assert torch.allclose(stats[0, 1:], table["stats"][i, 1:], rtol=1e-3, atol=1e-9), key
