"""DistributedDataParallel on CPU (gloo): 2 processes of train.py under torchrun with
--check-sync (after every step every rank holds bitwise rank 0's parameters; a non-finite loss
on any rank would stop all of them). The check itself is tested in test_distributed_sync.py."""
import os
import subprocess
import sys

from engine.checkpoint import load_checkpoint
from engine.run_dir import read_metrics
from tiny_train import tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_processes_gloo(tmp_path_factory, tiny_demo_root):
    data_root = tiny_demo_root
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
    ddp = [line for line in log.splitlines() if "DDP:" in line]
    assert len(ddp) == 1 and "2 processes" in ddp[0] and "2 identities" in ddp[0]
    sync = [line for line in log.splitlines() if "check-sync:" in line]
    assert len(sync) == 1 and "identical" in sync[0] and "2 steps" in sync[0]
    assert log.count("epoch 0 [") == 2  # rank 0 alone logs
    assert [r["epoch"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [-1, 0]
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert ckpt["meta"]["world_size"] == 2 and ckpt["global_step"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
