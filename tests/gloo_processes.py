"""Run a test's worker in several local gloo processes (the torchrun layout, without torchrun).

``run_gloo(worker, args, nprocs, timeout_s)`` spawns ``worker(rank, port, *args)`` in `nprocs`
processes, `port` a free local TCP port for ``MASTER_PORT``, and fails the test (terminating
them) when they have not all finished within `timeout_s`; a worker's exception fails it too.
"""
import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(worker, args, nprocs, timeout_s):
    context = mp.start_processes(worker, args=(free_port(),) + tuple(args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the %d gloo processes did not finish within %d s" % (nprocs, timeout_s))
