"""FusionReID's losses, optimizer groups and learning-rate schedule against the released code
(tests/golden/fusionreid/losses.pt and schedule.pt: values produced by running it)."""
import pytest
import torch
from torch import nn

from fusionreid_golden import load_golden
from engine.solver import LRScheduler, bias_groups, build_optimizer, build_scheduler
from loss.cross_entropy import identity_loss
from loss.fusionreid import HEADS as CRITERION_HEADS, FusionReIDCriterion
from loss.triplet import hardest_distances, triplet_loss
from utils.config import build_config
from utils.errors import ConfigError

HEADS = ["cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit"]


def _cfg(*opts):
    return build_config("sysu", opts=list(opts), validate=False)


def _inputs(case, dtype=torch.float32):
    inputs = case["inputs"]
    out = {"pids": inputs["target"]}
    for k, h in enumerate(HEADS, 1):
        out["logits_" + h] = inputs["score_%d" % k].to(dtype).clone().requires_grad_(True)
        out["feat_" + h] = inputs["feat_%d" % k].to(dtype).clone().requires_grad_(True)
    return out


def test_label_smoothed_ce_and_triplets_match_the_released_losses():
    case = load_golden("losses.pt")
    want, grads = case["outputs_eval"], case["grads"]
    x = _inputs(case)
    lsce = identity_loss(x["logits_cnn"], x["pids"], label_smooth=0.1)
    torch.testing.assert_close(lsce, want["lsce"], rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(lsce, x["logits_cnn"])
    torch.testing.assert_close(g, grads["lsce"]["score_1"], rtol=1e-5, atol=1e-8)

    d_ap, d_an = hardest_distances(x["feat_cnn"], x["pids"])
    torch.testing.assert_close(d_ap, want["tri_soft_dist_ap"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_an, want["tri_soft_dist_an"], rtol=1e-6, atol=1e-6)
    for key, margin in (("tri_soft", None), ("tri_margin0.3", 0.3)):
        loss = triplet_loss(x["feat_cnn"], x["pids"], margin)
        torch.testing.assert_close(loss, want[key], rtol=1e-6, atol=0)
        (g,) = torch.autograd.grad(loss, x["feat_cnn"])
        torch.testing.assert_close(g, grads[key]["feat_1"], rtol=1e-5, atol=1e-8)


def test_anchor_is_its_own_positive_at_distance_1e_6():
    feat = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    d_ap, d_an = hardest_distances(feat, torch.tensor([0, 1]))
    torch.testing.assert_close(d_ap, torch.tensor([1e-6, 1e-6]))
    torch.testing.assert_close(d_an, torch.tensor([5.0, 5.0]))
    # soft margin by hand: log(1 + exp(-(5 - 1e-6)))
    want = torch.log1p(torch.exp(torch.tensor(-(5.0 - 1e-6))))
    torch.testing.assert_close(triplet_loss(feat, torch.tensor([0, 1]), None), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_six_head_criterion_matches_the_released_sum(dtype):
    case = load_golden("losses.pt")
    want, grads = case["outputs_eval"], case["grads"]["six_head_total"]
    crit = FusionReIDCriterion(_cfg("LOSS.LABEL_SMOOTH", 0.1))
    assert tuple(_cfg().LOSS.FUSIONREID.HEADS) == CRITERION_HEADS == tuple(HEADS)
    assert crit.required_outputs == tuple(n for h in HEADS for n in ("logits_" + h, "feat_" + h))
    x = _inputs(case, dtype)
    total, terms, info = crit(x, {"pids": x["pids"]}, 0)
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(total.float(), want["six_head_total"], **tol)
    heads = sum(float(want["head_%d" % k]) for k in range(1, 7))
    assert terms["total"] == pytest.approx(heads, rel=1e-6)
    assert info == {}
    names = [n for h in HEADS for n in ("logits_" + h, "feat_" + h)]
    got = torch.autograd.grad(total, [x[n] for n in names])
    for k, (name, g) in enumerate(zip(names, got)):
        ref = grads[("score_%d" if name.startswith("logits") else "feat_%d") % (k // 2 + 1)]
        torch.testing.assert_close(g.float(), ref, rtol=1e-4, atol=1e-7)


def test_hinge_variant_and_bad_heads():
    case = load_golden("losses.pt")
    crit = FusionReIDCriterion(_cfg("LOSS.LABEL_SMOOTH", 0.1, "LOSS.FUSIONREID.SOFT_MARGIN", False,
                                    "LOSS.FUSIONREID.HEADS", ["cnn"]))
    x = _inputs(case)
    total, terms, _ = crit(x, {"pids": x["pids"]}, 0)
    want = case["outputs_eval"]["lsce"] + case["outputs_eval"]["tri_margin0.3"]
    torch.testing.assert_close(total, want, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="LOSS.FUSIONREID.HEADS"):
        FusionReIDCriterion(_cfg("LOSS.FUSIONREID.HEADS", ["cnn", "cnn"]))


class _Tiny(nn.Module):
    """The released schedule case's model: fc (weight, bias), bn (weight; bias frozen), gap.p."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.bn.bias.requires_grad_(False)
        self.gap = nn.Module()
        self.gap.p = nn.Parameter(torch.ones(1) * 3)

    def param_groups(self, cfg):
        return bias_groups(self.named_parameters(), cfg)


def _recipe_cfg(*opts):
    return _cfg("SOLVER.BASE_LR", 0.005, "SOLVER.WEIGHT_DECAY", 1e-4, "SOLVER.NESTEROV", False,
                "SOLVER.SCHEDULER", "warmup_cosine", "SOLVER.MAX_EPOCHS", 180, "SOLVER.WARMUP_EPOCHS", 10, *opts)


def test_bias_groups_and_schedule_match_the_released_optimizer():
    case = load_golden("schedule.pt")
    model = _Tiny()
    cfg = _recipe_cfg()
    opt = build_optimizer(cfg, model)
    lr_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group
    # the released groups, one per tensor, in parameter-name order
    params = dict(model.named_parameters())
    for name, want in zip(case["param_names"], case["param_groups"]):
        group = lr_of[id(params[name])]
        assert group["lr"] == pytest.approx(want["lr"], rel=0, abs=0)
        assert group["weight_decay"] == want["weight_decay"]
        assert group["momentum"] == case["momentum"] and not group["nesterov"]
    assert id(model.bn.bias) not in lr_of
    sched = build_scheduler(cfg, opt)
    lr_per_epoch = case["lr_per_epoch"]  # [180 epochs, 4 tensors], the lr each released epoch trains at
    for epoch in range(180):
        sched.step(epoch)
        for name, want in zip(case["param_names"], lr_per_epoch[epoch].tolist()):
            assert lr_of[id(params[name])]["lr"] == want, (epoch, name)


def test_schedule_boundaries_by_hand_and_per_iteration():
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr_factor": 1.0},
                           {"params": [nn.Parameter(torch.zeros(1))], "lr_factor": 2.0}], lr=0.1)
    sched = LRScheduler(opt, 0.005, kind="warmup_cosine", warmup_epochs=10, max_epochs=180,
                        warmup_lr_init=5e-5, min_lr=1e-5)
    sched.step(0)  # released epoch 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5 + (0.005 - 5e-5) / 10,
                                                                 5e-5 + (0.01 - 5e-5) / 10], rel=1e-15)
    sched.step(9)  # released epoch 10: the cosine phase, not shifted by the warm-up
    import math
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 + 0.5 * (0.005 - 1e-5) * (1 + math.cos(math.pi * 10 / 180)))
    sched.step(179)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5]
    per_iter = LRScheduler(opt, 0.005, kind="warmup_cosine", warmup_epochs=10, max_epochs=180,
                           warmup_lr_init=5e-5, min_lr=1e-5, unit="iteration", iters_per_epoch=4)
    # at the start of an epoch the per-iteration value equals the per-epoch one; it rises within it
    assert per_iter.lr_at(3, 0) == sched.lr_at(3)
    assert sched.lr_at(3) < per_iter.lr_at(3, 2) < sched.lr_at(4)
    state = per_iter.state_dict()
    again = LRScheduler(opt, 1.0)
    again.load_state_dict(state)
    assert again.lr_at(3, 2) == per_iter.lr_at(3, 2)
