"""The parts of the unsupervised engine (engine/usl/) and the evaluator's raw flip average.

* the stage plans of the presets: SYSU (stage 1, the six camera-local runs in the released order
  with their radius, modality and epochs, stage 2), RegDB (stages 1 and 2), a stage run alone,
  and the refused plans;
* an epoch's stage-2 state (labels, the six memory banks, neighbour lists, match) survives a
  checkpoint round trip exactly, with the memory settings of the config;
* the monitoring figures against hand-computed NMI / ARI / purity and majority agreement;
* the val hold-out, the metrics trimming on resume, the selection rules, the evaluation
  schedule, the DDP row order;
* TEST.FLIP_MODE average_raw: normalise((raw(x) + raw(flip x)) / 2), and a clear error for a
  model without a raw descriptor.
"""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cluster.dtnl import NeighbourSets
from cluster.matching import match_clusters
from data.pseudo import ModalityListing
from engine.usl.epoch import view_major
from engine.usl.evaluation import evaluation_due, update_best
from engine.usl.labelling import EpochLabels, camera_local_lookup, normalised_centroids, training_listings
from engine.usl.monitor import label_stats, match_stats
from engine.usl.stages import run_plan, stage_plan
from engine.usl.state import trim_usl_metrics
from evaluation.embeddings import extract_features
from loss.tokenmatcher import Stage2Memories
from model.base import INFRARED, VISIBLE, ReIDModel
from model.tokenmatcher.encoder import TokenMatcherEncoder, flip_average
from utils.config import build_config
from utils.errors import ConfigError
from utils.io import append_jsonl


def preset(dataset, *opts):
    return build_config(dataset, method="tokenmatcher", opts=list(opts))


def test_sysu_plan_is_the_released_stage_order():
    plan = stage_plan(preset("sysu"))
    assert [s.name for s in plan] == ["stage1", "cam2", "cam5", "cam0", "cam1", "cam3", "cam4", "stage2"]
    assert [s.index for s in plan] == list(range(8))
    s1, s2 = plan[0], plan[-1]
    assert (s1.kind, s1.epochs, s1.iters, s1.lr, s1.t_max, s1.eta_min, s1.eps, s1.best_metric, s1.start) == \
        ("stage1", 50, 200, 3.5e-4, 50, 1e-6, 0.6, "mAP", "model")
    assert (s2.kind, s2.epochs, s2.iters, s2.lr, s2.t_max, s2.eta_min, s2.best_metric, s2.start) == \
        ("stage2", 50, 200, 3.5e-5, 50, 1e-7, "rank1", "stage1")
    cams = {s.camera: s for s in plan[1:-1]}
    assert {c: s.eps for c, s in cams.items()} == {2: 0.6, 5: 0.2, 0: 0.2, 1: 0.2, 3: 0.5, 4: 0.5}
    assert {c: s.modality for c, s in cams.items()} == {2: INFRARED, 5: INFRARED, 0: VISIBLE, 1: VISIBLE,
                                                        3: VISIBLE, 4: VISIBLE}
    assert {c: s.epochs for c, s in cams.items()} == {2: 25, 5: 25, 0: 20, 1: 20, 3: 20, 4: 20}
    assert all((s.kind, s.iters, s.lr, s.t_max, s.best_metric, s.start) == ("camera", 50, 3.5e-4, 50, None, "stage1")
               for s in cams.values())
    alone = run_plan(preset("sysu"), "cam3")
    assert [(s.name, s.index) for s in alone] == [("cam3", 5)]  # same random streams as in the full plan
    assert [s.name for s in stage_plan(preset("demo"))] == [s.name for s in plan]


def test_regdb_plan_and_refused_plans():
    plan = stage_plan(preset("regdb"))
    assert [(s.name, s.epochs, s.iters, s.lr, s.t_max, s.eta_min, s.eps) for s in plan] == [
        ("stage1", 35, 100, 3.5e-5, 35, 1e-7, 0.2), ("stage2", 35, 100, 3.5e-5, 35, 1e-7, 0.2)]
    with pytest.raises(ConfigError, match="must be empty on RegDB"):
        stage_plan(preset("regdb", "USL.CAMERA.CAMERAS", "[0]"))
    with pytest.raises(ConfigError, match="distinct SYSU camera ids"):
        stage_plan(preset("sysu", "USL.CAMERA.CAMERAS", "[2,2,0,1,3,4]"))
    with pytest.raises(ConfigError, match="6 values"):
        stage_plan(preset("sysu", "USL.CAMERA.EPS", "[0.2]"))
    with pytest.raises(ConfigError, match="USL.STAGE2.EPOCHS must be >= 1"):
        stage_plan(preset("sysu", "USL.STAGE2.EPOCHS", "0"))
    assert [s.name for s in stage_plan(preset("sysu", "USL.CAMERA.CAMERAS", "[]", "USL.CAMERA_PRUNING",
                                              "False"))] == ["stage1", "stage2"]


def _stage2_labels(cfg):
    g = torch.Generator().manual_seed(0)
    f_rgb, f_ir = torch.randn(12, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = {"rgb": np.array([0, 1, 2, 0, 1, 2, 3, -1, 3, 4, 4, 0]), "ir": np.array([0, 1, 2, 2, 1, 0, -1, 1, 0])}
    c_rgb, c_ir = normalised_centroids(f_rgb, labels["rgb"]), normalised_centroids(f_ir, labels["ir"])
    match = match_clusters(c_rgb, c_ir, 2)
    banks = {"mixed_ir": c_ir + 0.1, "mixed_rgb": c_rgb - 0.1, "modality_ir": c_ir, "modality_rgb": c_rgb,
             "instance_ir": F.normalize(f_ir, dim=1), "instance_rgb": F.normalize(f_rgb, dim=1)}
    memories = Stage2Memories.from_banks(banks, temp=cfg.USL.TEMP, mixed_momentum=cfg.USL.MOMENTUM_MIXED,
                                         modality_momentum=cfg.USL.MOMENTUM_MODALITY)
    neighbours = NeighbourSets(ir=[[0, 5], [1]] + [[i] for i in range(2, 9)],
                               rgb=[[i, (i + 3) % 12] for i in range(12)], i2r=[[]] * 9, r2i=[[1, 2, 3]] * 12)
    return EpochLabels("stage2", labels, memories, neighbours, match)


def test_stage2_epoch_state_round_trip_is_exact(tmp_path):
    cfg = preset("sysu")
    labelled = _stage2_labels(cfg)
    path = str(tmp_path / "state.pt")
    torch.save(labelled.state_dict(), path)
    back = EpochLabels.from_state_dict(torch.load(path, weights_only=True), cfg, "cpu")
    assert back.kind == "stage2" and all(np.array_equal(back.labels[k], labelled.labels[k]) for k in ("rgb", "ir"))
    for name, bank in labelled.memories.banks().items():
        assert torch.equal(back.memories.banks()[name], bank), name
        memory = getattr(back.memories, name)
        assert memory.momentum == getattr(labelled.memories, name).momentum and memory.temp == 0.05
    assert back.memories.mixed_ir.momentum == 0.8 and back.memories.modality_rgb.momentum == 0.2
    assert back.neighbours == labelled.neighbours
    assert (back.match.r2i, back.match.i2r, back.match.mirror) == (labelled.match.r2i, labelled.match.i2r, False)
    assert list(back.match.i2r) == list(labelled.match.i2r)  # insertion order kept
    assert torch.equal(back.match.similarity, labelled.match.similarity)


def _nmi_ari(truth, pred):
    """Arithmetic-mean NMI and ARI from the contingency table (independent of scikit-learn)."""
    t_ids, t = np.unique(truth, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    table = np.zeros((len(t_ids), len(p_ids)))
    np.add.at(table, (t, p), 1)
    n = table.sum()
    pij, pi, pj = table / n, table.sum(1) / n, table.sum(0) / n
    mi = sum(pij[i, j] * math.log(pij[i, j] / (pi[i] * pj[j])) for i in range(len(pi)) for j in range(len(pj))
             if pij[i, j] > 0)
    h = lambda q: -sum(x * math.log(x) for x in q if x > 0)  # noqa: E731
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index = comb(table).sum()
    expected = comb(table.sum(1)).sum() * comb(table.sum(0)).sum() / comb(n)
    maximum = (comb(table.sum(1)).sum() + comb(table.sum(0)).sum()) / 2
    return mi / ((h(pi) + h(pj)) / 2), (index - expected) / (maximum - expected)


def test_label_stats_against_hand_computed_figures():
    labels = np.array([0, 0, 1, 1, -1, 2, 2, 2])
    truth = np.array([5, 5, 5, 6, 7, 8, 8, 6])
    stats = label_stats(labels, truth)
    assert (stats["clusters"], stats["outliers"], stats["images"]) == (3, 1, 8)
    keep = labels >= 0
    nmi, ari = _nmi_ari(truth[keep], labels[keep])
    assert stats["nmi"] == pytest.approx(nmi, abs=1e-12) and stats["ari"] == pytest.approx(ari, abs=1e-12)
    assert stats["purity"] == pytest.approx((2 + 1 + 2) / 7)  # majorities 5, 5 (tie -> smaller id), 8
    assert label_stats(np.array([-1, -1]), np.array([0, 1]))["nmi"] is None


def test_match_stats_majority_agreement():
    # RGB clusters 0, 1 (identities 3, 4); IR clusters 0, 1 (identities 4, 3): the matching of
    # centroids that point the same way for the same identity
    c_rgb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c_ir = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    match = match_clusters(c_rgb, c_ir, 2)
    assert match.r2i == {0: 1, 1: 0}
    stats = match_stats(match, np.array([0, 0, 1]), np.array([3, 3, 4]), np.array([0, 1]), np.array([4, 3]))
    assert stats["agreement"] == 1.0 and stats["rgb_clusters"] == 2 and stats["mirror"] is False
    stats = match_stats(match, np.array([0, 0, 1]), np.array([3, 3, 4]), np.array([0, 1]), np.array([3, 4]))
    assert stats["agreement"] == 0.0


def test_camera_local_lookup_drops_local_outliers():
    index = camera_local_lookup({2: (torch.tensor([4, 7, 9]), torch.tensor([1, -1, 0]))})
    assert index == {2: {4: 1, 9: 0}}


def _listing(modality, pids):
    n = len(pids)
    return ModalityListing(modality, ["img%d" % i for i in range(n)], ["p%d_%d" % (modality, i) for i in range(n)],
                           np.zeros(n), pids)


def test_val_selection_holds_out_the_last_identities():
    rgb, ir = _listing(0, [0, 3, 1, 4, 2]), _listing(1, [4, 0, 3])
    assert training_listings((rgb, ir), preset("sysu")) == (rgb, ir)
    kept = training_listings((rgb, ir), preset("sysu", "SOLVER.SELECT_BY", "val", "DATASET.VAL_IDS", "2"))
    assert kept[0].true_pids.tolist() == [0, 1, 2] and kept[0].paths == ["p0_0", "p0_2", "p0_4"]
    assert kept[0].rows.tolist() == [0, 1, 2] and kept[1].true_pids.tolist() == [0]


def test_trim_metrics_keeps_what_the_checkpoint_covers(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    records = [{"kind": "eval", "stage_index": -1, "epoch": -1}, {"kind": "clusters", "stage_index": 0, "epoch": 0},
               {"kind": "eval", "stage_index": 0, "epoch": 0}, {"kind": "clusters", "stage_index": 0, "epoch": 1},
               {"kind": "eval", "stage_index": 0, "epoch": 1}, {"kind": "clusters", "stage_index": 1, "epoch": 0}]
    for r in records:
        append_jsonl(path, r)
    from engine.run_dir import read_metrics

    assert trim_usl_metrics(path, 0, 0, True) == 2  # inside epoch 1 of stage 0: its clustering is kept
    assert read_metrics(path) == records[:4]
    assert trim_usl_metrics(path, 0, 0, False) == 1  # epoch 1 redone from its start
    assert read_metrics(path) == records[:3]


def test_selection_rules_and_evaluation_schedule():
    stage1, stage2 = stage_plan(preset("sysu"))[0], stage_plan(preset("sysu"))[-1]
    best = {}
    rec = lambda r1, m: {"test": {"rank1": r1, "mAP": m}, "val": {"rank1": m, "mAP": r1}}  # noqa: E731
    cfg = preset("sysu")
    assert update_best(cfg, best, stage1, rec(0.5, 0.3), 6) and best["stage1"]["value"] == 0.3
    assert not update_best(cfg, best, stage1, rec(0.9, 0.2), 7)  # stage 1 selects by mAP
    assert update_best(cfg, best, stage2, rec(0.4, 0.1), 7) and best["stage2"]["metric"] == "rank1"
    assert not update_best(cfg, best, stage1, {}, 8)
    val = preset("sysu", "SOLVER.SELECT_BY", "val", "DATASET.VAL_IDS", "3")
    assert update_best(val, {}, stage1, rec(0.5, 0.3), 6)
    last = preset("sysu", "SOLVER.SELECT_BY", "last")
    chosen = {}
    assert update_best(last, chosen, stage2, {}, 3) and chosen["stage2"] == {"value": None, "epoch": 3,
                                                                             "metric": "rank1", "select_by": "last"}
    assert [e for e in range(50) if evaluation_due(cfg, stage1, e)] == list(range(6, 50))
    assert not any(evaluation_due(cfg, s, e) for s in stage_plan(cfg)[1:-1] for e in range(25))
    sparse = preset("sysu", "USL.EVAL_START", "10", "USL.EVAL_PERIOD", "15")
    assert [e for e in range(50) if evaluation_due(sparse, stage2, e)] == [10, 25, 40, 49]


def test_ddp_rows_come_back_in_the_single_process_order():
    # two processes, each its items of the global batch in two view blocks
    rank0 = torch.tensor([0, 1, 10, 11])  # items 0, 1: view 1 rows, then view 2 rows
    rank1 = torch.tensor([2, 3, 12, 13])
    assert view_major([rank0, rank1], 2).tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert view_major([torch.tensor([0, 1]), torch.tensor([2, 3])], 1).tolist() == [0, 1, 2, 3]


class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, k):
        return self.images[k], k


def test_flip_mode_average_raw_is_the_released_descriptor():
    torch.manual_seed(0)
    model = TokenMatcherEncoder(img_size=(64, 32), num_tokens=2, embed_dim=16, depth=2, num_heads=2, stem_width=8)
    with torch.no_grad():
        for bn in model.token_bns:
            bn.running_var.uniform_(0.2, 3.0)
            bn.running_mean.normal_(0, 0.5)
    images = torch.randn(6, 3, 64, 32)
    cfg = build_config(opts=["TEST.FLIP", "True", "TEST.FLIP_MODE", "average_raw", "TEST.NUM_WORKERS", "0"])
    out = extract_features(model, _Images(images), cfg, "infrared", "cpu")
    model.eval()
    with torch.no_grad():
        raw = (model.embed(images, "infrared") + model.embed(images.flip(3), "infrared")) / 2
    torch.testing.assert_close(out["feat"], F.normalize(raw, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["feat"], flip_average(model, images, "infrared"), rtol=0, atol=1e-6)
    mean = extract_features(model, _Images(images), cfg, "infrared", "cpu", flip_mode="mean")["feat"]
    assert (mean - out["feat"]).abs().max() > 1e-4  # the mean of the normalised outputs differs

    class NoRaw(ReIDModel):
        embedding_sets = ("a",)

        def forward(self, images, modality, camids=None):
            return {"a": F.normalize(images.flatten(1), dim=1)}

    with pytest.raises(ConfigError, match="average_raw needs a model .* NoRaw"):
        extract_features(NoRaw(), _Images(images), cfg, "visible", "cpu")


def test_presets_are_valid_and_keep_the_released_values():
    sysu, regdb = preset("sysu"), preset("regdb")
    assert sysu.OUTPUT_DIR == "" and sysu.TEST.FLIP_MODE == "average_raw" and list(sysu.INPUT.SIZE_TEST) == [384, 128]
    assert (sysu.USL.MOMENTUM, regdb.USL.MOMENTUM, regdb.USL.DTNL_VOTES, regdb.MODEL.TOKENMATCHER.NUM_TOKENS) == \
        (0.2, 0.8, 6, 6)
    assert (regdb.USL.LAMBDA_NEIGHBOUR, regdb.USL.LAMBDA_MATE, sysu.USL.LAMBDA_MATE_LATE) == (0.1, 0.01, 0.12)
    assert (regdb.USL.CAMERA_SLOT_STAGE2, regdb.USL.INPUT.RESIZE_FILTER, regdb.TEST.DIRECTION) == \
        ("camera", "bilinear", "vis2ir")
    demo = preset("demo")
    assert not demo.MODEL.PRETRAINED and os.path.basename(demo.OUTPUT_DIR) == "tokenmatcher_demo"


def test_batchnorm_calibration_is_the_average_of_the_batch_statistics():
    from data.usl_transforms import ClusterTransform
    from engine.usl.labelling import calibrate_batchnorm

    torch.manual_seed(0)
    model = TokenMatcherEncoder(img_size=(64, 32), num_tokens=2, embed_dim=16, depth=2, num_heads=2, stem_width=8)
    g = np.random.default_rng(0)
    arrays = [g.integers(0, 255, size=(n, 70, 30, 3), dtype=np.uint8) for n in (5, 3)]
    listings = tuple(ModalityListing(m, arrays[m], ["%d_%d" % (m, i) for i in range(len(arrays[m]))],
                                     np.zeros(len(arrays[m])), np.zeros(len(arrays[m]))) for m in (0, 1))
    cfg = preset("demo")
    before = copy.deepcopy(model)
    model.train()
    # 2 RGB + 2 IR rows per batch; the third batch would hold one image, which BatchNorm cannot take
    assert calibrate_batchnorm(model, listings, cfg, "cpu", batch_size=4) == 2
    assert model.training and all(bn.momentum == 0.1 for bn in model.token_bns)
    transform = ClusterTransform((64, 32))
    before.eval()  # no stochastic depth; batch statistics in every BatchNorm, as during the pass
    for bn in before.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.train()
    means = []
    with torch.no_grad():
        for start in (0, 2):
            rows = [(m, i) for m in (0, 1) for i in range(start, min(start + 2, len(arrays[m])))]
            x = torch.stack([transform(arrays[m][i]) for m, i in rows])
            means.append(before._encode(x, torch.tensor([m for m, _ in rows]))[1][:, 0].mean(0))
    torch.testing.assert_close(model.token_bns[0].running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    assert int(model.token_bns[0].num_batches_tracked) == 2
