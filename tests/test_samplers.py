"""The balanced (IV-REID) and PK samplers: the released order of tests/golden/ivreid/sampler.pt,
resume by replay, the seeded law checked batch by batch, DDP shards, and bad input."""
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.errors import DatasetError
from data.samplers.balanced import BalancedSampler
from data.samplers.base import SampleIndex, SamplePair, epoch_seed
from data.samplers.pk import PKSampler
from data.samplers.registry import SAMPLERS
from utils.config import get_default_config
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ivreid", "sampler.pt")
# camera id -> 1 for RGB, as the released sampler reads it
CAMERA_IS_RGB = {"SYSUMM": [1, 1, 0, 1, 1, 0], "RegDB": [0, 1]}


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def _golden_case(golden, case):
    pids = golden["inputs"][case]["pids"].numpy()
    camids = golden["inputs"][case]["camids"].numpy()
    args = golden["init_args"][case]
    rgb = CAMERA_IS_RGB[args["dataset_arg"]]
    modality = np.array([0 if rgb[c - 1] else 1 for c in camids], dtype=np.int64)
    k = args["num_instances"]
    return pids, modality, args["batch_size"] // (2 * k), k


def _released_order(pairs, k):
    """The released index order of (visible, infrared) pairs taken K at a time: per chunk the K
    infrared items, then the K visible items, position j of both from pair j."""
    out = []
    for s in range(0, len(pairs), k):
        chunk = pairs[s:s + k]
        out += [ir for _, ir in chunk] + [vis for vis, _ in chunk]
    return out


def test_released_order_maps_chunks_to_pairs():
    pairs = [(10, 20), (11, 21), (12, 22), (13, 23), (30, 40), (31, 41)]
    assert _released_order(pairs, 2) == [20, 21, 10, 11, 22, 23, 12, 13, 40, 41, 30, 31]


@pytest.mark.parametrize("case", ["sysu_like", "regdb_like", "regdb_full_size"])
def test_reference_order_is_the_released_one(golden, case):
    pids, modality, p, k = _golden_case(golden, case)
    epochs = golden["outputs_eval"][case]["epochs"]
    sampler = BalancedSampler(pids, modality, p, k, seed=2019, order="reference")
    assert sampler.ids == golden["outputs_eval"][case]["sampler_pids_order"].tolist()
    assert sampler.batch_size == p * k
    for epoch, released in enumerate(epochs):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert all(isinstance(x, SamplePair) for x in pairs)
        assert _released_order(pairs, k) == released.tolist()
        assert len(sampler) == len(pairs) == len(released) // 2
        assert all(modality[v] == 0 and modality[i] == 1 and pids[v] == pids[i] for v, i in pairs)
    # Resume: a fresh sampler asked for the last epoch replays the ones before it, and going
    # back to epoch 0 restarts the streams.
    fresh = BalancedSampler(pids, modality, p, k, seed=2019, order="reference")
    fresh.set_epoch(len(epochs) - 1)
    assert _released_order(list(fresh), k) == epochs[-1].tolist()
    fresh.set_epoch(0)
    assert _released_order(list(fresh), k) == epochs[0].tolist()


def test_an_identity_with_fewer_than_k_infrared_images_is_upsampled():
    # The released sampler fails on this input (NameError); here the infrared list is
    # upsampled with replacement like the visible one.
    pids = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=np.int64)
    modality = np.array([0] * 8 + [1] * 7, dtype=np.int64)
    sampler = BalancedSampler(pids, modality, 2, 4, seed=2019, order="reference")
    pairs = list(sampler)
    assert len(pairs) == 8
    first = [ir for vis, ir in pairs if pids[vis] == 0]
    assert len(first) == 4 and set(first) <= {8, 9, 10} and len(set(first)) < 4


def test_reference_order_shards_by_identity_position(golden):
    pids, modality, p, k = _golden_case(golden, "regdb_like")
    released = golden["outputs_eval"]["regdb_like"]["epochs"][1].tolist()
    shards = []
    for rank in range(2):
        sampler = BalancedSampler(pids, modality, p, k, seed=2019, order="reference", rank=rank, world_size=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        assert len(sampler) == len(released) // 4 and sampler.batch_size == p * k // 2
    per = p * k // 2
    merged = []
    for b in range(len(shards[0]) // per):
        merged += shards[0][b * per:(b + 1) * per] + shards[1][b * per:(b + 1) * per]
    assert _released_order(merged, k) == released


def _source(seed=0):
    """A small training set: 14 ids with 2..11 items per modality (some below K = 4, unequal
    counts), items of both modalities interleaved and out of id order."""
    rng = np.random.default_rng(seed)
    rows = [(pid, mod) for pid in range(14) for mod in (0, 1) for _ in range(int(rng.integers(2, 12)))]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    pids = np.array([r[0] for r in rows], dtype=np.int64)
    modality = np.array([r[1] for r in rows], dtype=np.int64)
    return pids, modality


def _counts(pids, modality, mod):
    return Counter(pids[modality == mod].tolist())


def test_seeded_law_per_batch_and_epoch():
    pids, modality, p, k = (*_source(), 3, 4)
    n_vis, n_ir = _counts(pids, modality, 0), _counts(pids, modality, 1)
    chunks = {pid: min(max(n_vis[pid], k), max(n_ir[pid], k)) // k for pid in n_vis}
    sampler = BalancedSampler(pids, modality, p, k, seed=5)
    # enough epochs for some to end with P - 1 identities left over
    for epoch in range(20):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert len(pairs) == len(sampler) and len(pairs) % sampler.batch_size == 0
        used = Counter()
        for b in range(0, len(pairs), p * k):
            batch = pairs[b:b + p * k]
            ids = [pids[batch[j][0]] for j in range(0, p * k, k)]
            assert len(set(ids)) == p
            for j, (vis, ir) in enumerate(batch):
                assert modality[vis] == 0 and modality[ir] == 1
                assert pids[vis] == pids[ir] == ids[j // k]
            used.update(ids)
        # no item repeats unless its identity had fewer than K in that modality
        for mod, counts in ((0, n_vis), (1, n_ir)):
            seen = Counter(pair[mod] for pair in pairs)
            assert all(n == 1 or counts[pids[i]] < k for i, n in seen.items())
        # every identity gives at most its chunks, and the epoch ends only when fewer than
        # P identities have chunks left
        assert all(used[pid] <= chunks[pid] for pid in chunks)
        assert sum(used[pid] < chunks[pid] for pid in chunks) < p


def test_seeded_plan_depends_on_seed_and_epoch_only():
    pids, modality = _source()
    a = BalancedSampler(pids, modality, 3, 4, seed=5)
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        list(a)
    a.set_epoch(3)
    b = BalancedSampler(pids, modality, 3, 4, seed=5)
    b.set_epoch(3)
    first = [(x, x.seed) for x in a]
    assert first == [(x, x.seed) for x in b]
    b.set_epoch(2)
    assert [tuple(x) for x in b] != [x for x, _ in first]
    other = BalancedSampler(pids, modality, 3, 4, seed=6)
    other.set_epoch(3)
    assert [tuple(x) for x in other] != [x for x, _ in first]


def test_generator_is_reseeded_per_epoch():
    pids, modality = _source()
    for sampler in (BalancedSampler(pids, modality, 3, 4, seed=5), PKSampler(pids, 3, 4, seed=5)):
        sampler.generator = torch.Generator()
        sampler.set_epoch(7)
        assert sampler.generator.initial_seed() == epoch_seed(5, 7)


@pytest.mark.parametrize("order", ["seeded", "reference"])
def test_ddp_shards_are_disjoint_and_form_the_global_batch(order):
    pids, modality = _source()
    p, k, world = 4, 2, 2
    single = BalancedSampler(pids, modality, p, k, seed=3, order=order)
    single.set_epoch(2)
    whole = [(tuple(x), x.seed) for x in single]
    shards = []
    for rank in range(world):
        s = BalancedSampler(pids, modality, p, k, seed=3, order=order, rank=rank, world_size=world)
        s.set_epoch(2)
        shards.append([(tuple(x), x.seed) for x in s])
        assert len(s) == len(whole) // world
    per = p * k // world
    for b in range(len(whole) // (p * k)):
        parts = [shard[b * per:(b + 1) * per] for shard in shards]
        assert parts[0] + parts[1] == whole[b * p * k:(b + 1) * p * k]
        assert not {x for x, _ in parts[0]} & {x for x, _ in parts[1]}


def test_pk_law():
    pids, _ = _source()
    p, k = 4, 3
    counts = Counter(pids.tolist())
    chunks = {pid: max(n, k) // k for pid, n in counts.items()}
    sampler = PKSampler(pids, p, k, seed=1)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert all(isinstance(x, SampleIndex) for x in items) and len(items) == len(sampler)
        used = Counter()
        for b in range(0, len(items), p * k):
            batch = [int(pids[i]) for i in items[b:b + p * k]]
            ids = batch[::k]
            assert len(set(ids)) == p and batch == [pid for pid in ids for _ in range(k)]
            used.update(ids)
        seen = Counter(int(i) for i in items)
        assert all(n == 1 or counts[pids[i]] < k for i, n in seen.items())
        assert all(used[pid] <= chunks[pid] for pid in chunks)
        assert sum(used[pid] < chunks[pid] for pid in chunks) < p
    again = PKSampler(pids, p, k, seed=1)
    again.set_epoch(19)
    assert [(int(x), x.seed) for x in again] == [(int(x), x.seed) for x in sampler]
    halves = [PKSampler(pids, p, k, seed=1, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.set_epoch(19)
    shards = [[int(x) for x in h] for h in halves]
    per = p * k // 2
    assert sum(([*shards[0][b:b + per], *shards[1][b:b + per]] for b in range(0, len(shards[0]), per)), []) \
        == [int(x) for x in sampler]


def _cfg(sampler, **dataloader):
    cfg = get_default_config()
    cfg.DATALOADER.SAMPLER = sampler
    cfg.SEED = 11
    for key, value in dataloader.items():
        setattr(cfg.DATALOADER, key, value)
    return cfg


def test_from_config_reads_the_dataloader_keys():
    pids, modality = _source()
    train_set = SimpleNamespace(pids=pids, modality=modality, camids=np.ones_like(pids))
    cfg = _cfg("balanced", NUM_IDS=4, NUM_POS=2, BALANCED_ORDER="reference")
    sampler = SAMPLERS.get("balanced").from_config(cfg, train_set, 1, 2)
    assert (sampler.collate, sampler.order, sampler.seed, sampler.batch_size) == ("paired", "reference", 11, 4)
    direct = BalancedSampler(pids, modality, 4, 2, seed=11, order="reference", rank=1, world_size=2)
    assert [tuple(x) for x in sampler] == [tuple(x) for x in direct]
    pk = SAMPLERS.get("pk").from_config(_cfg("pk", NUM_IDS=4, NUM_POS=2), train_set, 0, 1)
    assert (pk.collate, pk.batch_size) == ("single", 8)
    cfg.SOLVER.ITERS_PER_EPOCH = 5
    with pytest.raises(ConfigError, match="ITERS_PER_EPOCH"):
        SAMPLERS.get("balanced").from_config(cfg, train_set, 0, 1)


def test_bad_input_is_refused():
    pids, modality = _source()
    no_ir = modality.copy()
    no_ir[pids == 6] = 0
    with pytest.raises(DatasetError, match=r"no infrared images for ids \[6\]"):
        BalancedSampler(pids, no_ir, 3, 4)
    with pytest.raises(ConfigError, match="only 14 training identities"):
        BalancedSampler(pids, modality, 15, 4)
    with pytest.raises(ConfigError, match="divisible by the world size"):
        PKSampler(pids, 3, 4, world_size=2)
    with pytest.raises(ConfigError, match="BALANCED_ORDER"):
        BalancedSampler(pids, modality, 3, 4, order="released")
