"""engine.distributed.parameters_in_sync across two real processes (gloo on CPU).

In one process the check has nothing to compare and returns True, so only a multi-process
run shows that it detects a difference, wherever it is, and that every rank gets the same
verdict. Each rank builds the same tiny model; the cases change one parameter element by
one ulp on one rank, then restore it.
"""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.distributed import DistContext, parameters_in_sync
from gloo_processes import run_gloo

WORLD_SIZE = 2
TIMEOUT_S = 60
# case -> (rank that changes, parameter index in model.parameters(), element)
CHANGES = {
    "rank1_first_parameter": (1, 0, (0, 0)),
    "rank1_last_parameter": (1, -1, (1,)),
    "rank0_middle_parameter": (0, 2, (1, 3)),
}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        ctx = DistContext(rank=rank, world_size=WORLD_SIZE, backend="gloo")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
        params = list(model.parameters())
        verdicts = {"equal": parameters_in_sync(model, ctx)}
        for case, (changed_rank, index, element) in CHANGES.items():
            param = params[index]
            original = param.detach().clone()
            with torch.no_grad():
                if rank == changed_rank:
                    param[element] = torch.nextafter(param[element], torch.tensor(float("inf")))
            verdicts[case] = parameters_in_sync(model, ctx)
            with torch.no_grad():
                param.copy_(original)
        verdicts["restored"] = parameters_in_sync(model, ctx)
        # a float64 parameter one float64 ulp apart: below float32 precision
        model.double()
        with torch.no_grad():
            if rank == 1:
                params = list(model.parameters())
                params[0][0, 0] = torch.nextafter(params[0][0, 0], torch.tensor(float("inf"), dtype=torch.float64))
        verdicts["float64_ulp"] = parameters_in_sync(model, ctx)
        with open(os.path.join(out_dir, "rank%d.json" % rank), "w") as f:
            json.dump(verdicts, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sync"))
    run_gloo(_worker, (out_dir,), WORLD_SIZE, TIMEOUT_S)
    out = {}
    for rank in range(WORLD_SIZE):
        with open(os.path.join(out_dir, "rank%d.json" % rank)) as f:
            out[rank] = json.load(f)
    return out


def test_equal_parameters_are_in_sync(verdicts):
    assert all(v["equal"] for v in verdicts.values())


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_a_one_ulp_difference_on_one_rank_is_reported_by_every_rank(verdicts, case):
    assert [verdicts[rank][case] for rank in range(WORLD_SIZE)] == [False] * WORLD_SIZE


def test_a_float64_ulp_below_float32_precision_is_reported(verdicts):
    assert [verdicts[rank]["float64_ulp"] for rank in range(WORLD_SIZE)] == [False] * WORLD_SIZE


def test_in_sync_again_once_restored(verdicts):
    assert all(v["restored"] for v in verdicts.values())
