"""DistributedDataParallel on CPU (gloo): the parameter check itself, and 2 processes of
train.py under torchrun with --check-sync (after every step every rank holds bitwise rank 0's
parameters; a non-finite loss on any rank would stop all of them)."""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.checkpoint import load_checkpoint
from utils.distributed import DistContext, parameters_in_sync
from utils.run_dir import read_metrics
from tiny_train import tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, world_size=2, backend="gloo")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
        same = parameters_in_sync(model, ctx)
        with torch.no_grad():
            model[1].bias[0] += 1e-7 * rank  # one ulp-sized difference on rank 1 only
        differs = not parameters_in_sync(model, ctx)
        results[rank] = (same, differs)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parameters_in_sync_detects_a_tiny_difference():
    results = mp.Manager().dict()
    mp.spawn(_check_worker, args=(_free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, True), 1: (True, True)}


def test_torchrun_two_processes_gloo(tmp_path_factory):
    data_root = str(tmp_path_factory.getbasetemp() / "demo_tiny")
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    opts = tiny_opts(data_root, out, **{"SOLVER.EVAL_START": 1, "SOLVER.EVAL_PERIOD": 1,
                                        "SOLVER.EVAL_BEFORE_TRAIN": True})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--dataset", "demo", "--check-sync"]
    cmd += opts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(os.path.join(out, "train.log")).read()
    assert "2 process(es) (gloo)" in log
    assert "each of the 2 processes computes the loss on its shard of 2 identities" in log
    assert "check-sync: parameters identical on all 2 processes after each of the 2 steps" in log
    assert log.count("epoch 0 [") == 2  # rank 0 alone logs
    assert [r["epoch"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [-1, 0]
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert ckpt["meta"]["world_size"] == 2 and ckpt["global_step"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
