"""Contract tests over every registered part: a new model, criterion, sampler or dataset is
tested here without anyone writing a test for it.

* models: a tiny build; a train forward giving exactly ``train_outputs``; every registered
  criterion that fits it, with a backward pass (a model trained without labels, ``supervised =
  False``, has no criterion: its train outputs get a backward pass of their own); parameter groups that hold each trainable
  tensor once; an eval forward giving ``embedding_sets`` of unit rows and presets over them;
  a checkpoint round trip through ``load_model`` giving the same embeddings;
* criteria: each fits at least one registered model, and a model lacking an output it needs
  is refused when the run is built;
* samplers: epoch length, item types and the batch layout of their ``collate``, the same plan
  for the same (seed, epoch), and DDP shards that split each global batch;
* datasets: training items, the test split of each run test.py makes, run names and tags.
"""
import json

import numpy as np
import pytest
import torch

from data.registry import DATASETS
from data.samplers.base import COLLATE, SampleIndex, SamplePair
from data.samplers.registry import SAMPLERS
from data.train_set import TrainSet
from engine.checkpoint import make_checkpoint, save_checkpoint
from evaluation.embeddings import embedding_weights
from evaluation.metrics import PROTOCOLS
from loss import build_criterion, check_outputs
from loss.registry import CRITERIA
from model import build_model, load_model
from model.registry import MODELS
from utils.config import build_config
from utils.errors import ConfigError

NUM_CLASSES = 5
B = 4  # pairs per training batch: 4 visible + 4 infrared images


# Per-model settings that make the tiny build small (models not listed need none).
TINY_MODEL_OPTS = {
    **{name: {"MODEL.FUSIONREID.VIT_EMBED_DIM": 32, "MODEL.FUSIONREID.VIT_DEPTH": 1, "MODEL.FUSIONREID.VIT_NUM_HEADS": 2,
              "MODEL.FUSIONREID.MIX_DIM": 32, "MODEL.FUSIONREID.HTM_LAYER": 1, "MODEL.FUSIONREID.HTM_NUM_HEADS": 2,
              "MODEL.FUSIONREID.NUM_CAMERAS": 6} for name in ("fusionreid", "fusionreid_vi")},
    "tokenmatcher": {"MODEL.TOKENMATCHER.EMBED_DIM": 32, "MODEL.TOKENMATCHER.DEPTH": 2,
                     "MODEL.TOKENMATCHER.NUM_HEADS": 2, "MODEL.TOKENMATCHER.STEM_WIDTH": 8,
                     "MODEL.TOKENMATCHER.NUM_TOKENS": 3, "MODEL.TOKENMATCHER.GHOST_BATCHES": 2},
}


def tiny_config(model_name, **extra):
    opts = {"MODEL.NAME": model_name, "MODEL.BACKBONE": "resnet18", "MODEL.PRETRAINED": False,
            "INPUT.SIZE_TRAIN": "[64, 32]", "INPUT.SIZE_TEST": "[64, 32]"}
    opts.update(TINY_MODEL_OPTS.get(model_name, {}))
    opts.update(extra)
    return build_config(opts=[str(x) for kv in opts.items() for x in kv], validate=False)


def paired_batch():
    g = torch.Generator().manual_seed(0)
    pids = torch.tensor([0, 1, 2, 3])
    return {"images": torch.randn(2 * B, 3, 64, 32, generator=g), "pids": torch.cat([pids, pids]),
            "camids": torch.tensor([1] * B + [3] * B), "modality": torch.tensor([0] * B + [1] * B),
            "index": torch.arange(2 * B)}


def fitting(model_cls):
    return [name for name, cls in CRITERIA.items() if set(cls.required_outputs) <= set(model_cls.train_outputs)]


@pytest.fixture(scope="module", params=MODELS.names())
def built(request):
    torch.manual_seed(0)
    cfg = tiny_config(request.param)
    return cfg, build_model(cfg, NUM_CLASSES)


def test_model_train_forward_criteria_and_backward(built):
    cfg, model = built
    model.train()
    batch = paired_batch()
    criteria = fitting(type(model))
    if not getattr(type(model), "supervised", True):
        assert not criteria, "%s trains without labels, yet criteria %s fit it" % (type(model).__name__, criteria)
        model.zero_grad(set_to_none=True)
        outputs = model(batch["images"], batch["modality"], batch["camids"])
        assert set(outputs) == set(type(model).train_outputs)
        sum(v.float().pow(2).mean() for v in outputs.values()).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        return
    assert criteria, "no registered criterion fits the outputs of %s" % type(model).__name__
    for name in criteria:
        model.zero_grad(set_to_none=True)
        outputs = model(batch["images"], batch["modality"], batch["camids"])
        assert set(outputs) == set(type(model).train_outputs)
        crit_cfg = cfg.clone()
        crit_cfg.defrost()
        crit_cfg.LOSS.NAME = name
        total, terms, info = build_criterion(crit_cfg)(outputs, batch, 0)
        assert total.dim() == 0 and torch.isfinite(total)
        assert terms["total"] == pytest.approx(float(total.detach()), rel=1e-6)
        assert all(isinstance(v, float) for v in list(terms.values()) + list(info.values()))
        total.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_model_param_groups_hold_each_trainable_tensor_once(built):
    cfg, model = built
    groups = model.param_groups(cfg)
    assert all({"name", "params", "lr_factor"} <= set(g) for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_model_eval_embeddings_and_presets(built):
    cfg, model = built
    cls = type(model)
    assert cls.default_embedding in cls.embedding_presets
    for preset, weights in cls.embedding_presets.items():
        assert weights and set(weights) <= set(cls.embedding_sets), preset
        assert embedding_weights(model, preset) == [(n, float(weights[n])) for n in cls.embedding_sets if n in weights]
    model.eval()
    with torch.no_grad():
        for modality in ("visible", "infrared"):
            sets = model(paired_batch()["images"][:3], modality=modality, camids=torch.tensor([1, 2, 3]))
            assert list(sets) == list(cls.embedding_sets)
            for f in sets.values():
                assert f.shape[0] == 3 and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ConfigError, match="not an embedding"):
        embedding_weights(model, "no_such_preset")


def test_model_checkpoint_round_trip(built, tmp_path):
    cfg, model = built
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, make_checkpoint(model.state_dict(), cfg, NUM_CLASSES, epoch=0))
    loaded = load_model(path)
    assert type(loaded) is type(model)
    model.eval()
    x = paired_batch()["images"][:2]
    with torch.no_grad():
        cams = torch.arange(len(x)) % 3 + 1
        a, b = model(x, modality="infrared", camids=cams), loaded(x, modality="infrared", camids=cams)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_fits_a_model_and_refuses_the_others(name):
    cls = CRITERIA.get(name)
    assert cls.required_outputs
    models = [m for _, m in MODELS.items()]
    assert any(set(cls.required_outputs) <= set(m.train_outputs) for m in models), name
    criterion = build_criterion(tiny_config("cmfn", **{"LOSS.NAME": name}))
    for m in models:
        if not set(cls.required_outputs) <= set(m.train_outputs):
            with pytest.raises(ConfigError, match="needs the model outputs"):
                check_outputs(criterion, m)
        else:
            check_outputs(criterion, m)


class _Items:
    """The per-item arrays a sampler reads: 6 ids, each 6 visible and 5 infrared items, shuffled."""

    def __init__(self):
        pids = np.repeat(np.arange(6), 11)
        modality = np.tile(np.array([0] * 6 + [1] * 5), 6)
        order = np.random.default_rng(0).permutation(len(pids))
        self.pids, self.modality = pids[order], modality[order]
        self.camids = np.where(self.modality == 0, 1, 3)


def _sampler(name, epoch=1, rank=0, world_size=1):
    cfg = build_config(opts=["DATALOADER.SAMPLER", name, "DATALOADER.NUM_IDS", "4", "DATALOADER.NUM_POS", "2",
                             "SEED", "3"], validate=False)
    s = SAMPLERS.get(name).from_config(cfg, _Items(), rank, world_size)
    s.set_epoch(epoch)
    return s


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    items = _Items()
    s = _sampler(name)
    plan = list(s)
    assert s.collate in COLLATE and len(plan) == len(s) and len(s) % s.batch_size == 0 and len(s) > 0
    for item in plan:
        assert item.seed is not None
        if s.collate == "paired":
            assert isinstance(item, SamplePair)
            assert items.modality[item[0]] == 0 and items.modality[item[1]] == 1
            assert items.pids[item[0]] == items.pids[item[1]]
        else:
            assert isinstance(item, SampleIndex) and 0 <= item < len(items.pids)
    again = _sampler(name)
    assert [(tuple(i) if s.collate == "paired" else int(i), i.seed) for i in again] == \
        [(tuple(i) if s.collate == "paired" else int(i), i.seed) for i in plan]
    assert list(_sampler(name, epoch=2)) != plan


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_ddp_shards_split_each_global_batch(name):
    whole = list(_sampler(name))
    shards = [list(_sampler(name, rank=r, world_size=2)) for r in range(2)]
    per_batch = _sampler(name, rank=0, world_size=2).batch_size
    key = (lambda i: tuple(i)) if isinstance(whole[0], SamplePair) else int
    for b in range(len(whole) // (2 * per_batch)):
        parts = [[key(i) for i in sh[b * per_batch:(b + 1) * per_batch]] for sh in shards]
        assert sorted(parts[0] + parts[1]) == sorted(key(i) for i in whole[b * 2 * per_batch:(b + 1) * 2 * per_batch])


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_batches_collate_into_the_batch_layout(name):
    items = _Items()
    s = _sampler(name)

    class Images:
        def __getitem__(self, i):
            return np.full((4, 2, 3), i % 256, np.uint8)

        def __len__(self):
            return len(items.pids)

    from data.items import TrainItems

    ts = TrainSet(TrainItems(Images(), items.pids, items.camids, items.modality),
                  {0: lambda a, g: torch.from_numpy(a).permute(2, 0, 1).float(),
                   1: lambda a, g: torch.from_numpy(a).permute(2, 0, 1).float()})
    first = list(s)[:s.batch_size]
    batch = COLLATE[s.collate]([ts[i] for i in first])
    n = s.batch_size * (2 if s.collate == "paired" else 1)
    assert sorted(batch) == ["camids", "images", "index", "modality", "pids"]
    assert batch["images"].shape == (n, 3, 4, 2) and all(batch[k].shape == (n,) for k in batch if k != "images")
    assert torch.equal(batch["pids"], torch.from_numpy(items.pids[batch["index"].numpy()]))
    if s.collate == "paired":
        assert batch["modality"].tolist() == [0] * s.batch_size + [1] * s.batch_size
        assert torch.equal(batch["pids"][:s.batch_size], batch["pids"][s.batch_size:])


def _dataset_config(name, synthetic_root, tiny_demo_cfg, tmp_path_factory):
    if name == "demo":
        return tiny_demo_cfg
    if name == "demo_market":
        root = str(tmp_path_factory.mktemp("demo_market") / "demo_market")
        cfg = build_config(None, opts=["DATASET.NAME", name, "DATASET.ROOT", root, "DATASET.DEMO_TRAIN_IDS", "4",
                                       "DATASET.DEMO_TEST_IDS", "3", "INPUT.SIZE_TRAIN", "[32, 16]"])
        DATASETS.get(name).prepare(cfg)
        return cfg
    layouts = {"sysu": ("sysu", dict(preprocess=(16, 32))), "regdb": ("regdb", {}), "llcm": ("llcm", {}),
               "market1501": ("market", {}), "dukemtmc": ("duke", {}), "msmt17": ("msmt17", {})}
    if name not in layouts:
        pytest.fail("dataset %r has no synthetic layout in tests/test_contracts.py: add one" % name)
    layout, params = layouts[name]
    root = synthetic_root(layout, **params)
    if name in ("sysu", "regdb", "llcm"):
        return build_config(name, opts=["DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[32, 16]", "TEST.NUM_TRIALS", "2"])
    return build_config(None, opts=["DATASET.NAME", name, "DATASET.ROOT", root, "INPUT.SIZE_TRAIN", "[32, 16]"])


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name, synthetic_root, tiny_demo_cfg, tmp_path_factory):
    cfg = _dataset_config(name, synthetic_root, tiny_demo_cfg, tmp_path_factory)
    cls = DATASETS.get(name)
    ds = cls(cfg)
    h, w = cfg.INPUT.SIZE_TRAIN
    items = ds.train_items((w, h))
    assert len(items) > 0 and items.images[0].shape == (h, w, 3) and items.images[0].dtype == np.uint8
    modalities = set(np.unique(items.modality).tolist())
    assert modalities in ({0, 1}, {0})  # visible-infrared, or visible only
    classes = np.arange(items.pids.max() + 1)
    for m in modalities:
        assert np.array_equal(np.unique(items.pids[items.modality == m]), classes)
    assert isinstance(cls.run_name(cfg), str) and cls.run_name(cfg)
    assert all(isinstance(t, str) and t for t in cls.result_tags(cfg))
    json.dumps(cls.eval_info(cfg))
    runs = cls.test_runs(cfg, None)
    assert runs
    split = ds.test_split(cls.trial_config(cfg, runs[0]), runs[0])
    assert len(split.query) and len(split.gallery) and split.protocol in PROTOCOLS
    if modalities == {0, 1}:
        assert split.query_modality != split.gallery_modality
    else:
        assert split.query_modality == split.gallery_modality == "visible"
    for t in split.trials:
        assert len(t) and t.min() >= 0 and t.max() < len(split.gallery)
