"""Multi-process training: DistributedDataParallel, one process per GPU, launched by torchrun.

``torchrun --nproc_per_node N train.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address; without them the run is a single process and nothing here communicates.
The backend is nccl on CUDA and gloo on CPU (CPU runs are for tests and debugging).

Batches and the loss under DDP. The sampler shards every global batch of P identities x K
images per modality by identity: each of the N processes gets P/N identities (data/samplers/cross_modality.py),
so the global batch equals the single-process batch. Each process computes the whole loss
(ID, triplet, CPM, Ort, DCL) on its own shard, so the batch-hard triplet mining, the CPM
centres and the DCL hard negatives see P/N identities instead of P; DDP then averages the
gradients. This is the standard DDP practice; it is not numerically the single-process loss.

Only rank 0 logs, evaluates and writes files; the other ranks wait at :func:`barrier`.
"""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from utils.config import ConfigError

# Rank 0 evaluates while the others wait at a barrier: allow long evaluations.
BARRIER_TIMEOUT = datetime.timedelta(hours=3)


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(spec, local_rank=0, distributed=False):
    """torch.device for cfg.DEVICE ("auto", "cpu", "cuda", "cuda:N"); torchrun picks cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise ConfigError("DEVICE must be auto, cpu, cuda or cuda:N, got %r" % spec)
    if not torch.cuda.is_available():
        raise ConfigError("DEVICE %s requested but CUDA is not available; use DEVICE cpu" % spec)
    if distributed:
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def init_distributed(device_spec="auto"):
    """Join the torchrun process group if there is one; return this process's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank, world_size > 1)
    if world_size == 1:
        return DistContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=BARRIER_TIMEOUT)
    return DistContext(rank, world_size, local_rank, device, backend)


def cleanup(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx):
    if not ctx.distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def any_across_ranks(ctx, flags):
    """Element-wise OR of a list of booleans over all processes (one all-reduce)."""
    if not ctx.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_across_ranks(ctx, values):
    """Mean of a dict of floats over all processes (for logging)."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: v / ctx.world_size for k, v in zip(keys, t.tolist())}


def parameters_in_sync(model, ctx):
    """True when every process holds bitwise the same parameters as rank 0.

    Rank 0's flattened parameters are broadcast and compared exactly, then the verdicts are
    combined, so every rank returns the same answer. A debugging check (``--check-sync``):
    it costs one broadcast of the whole model.
    """
    if not ctx.distributed:
        return True
    with torch.no_grad():
        # float64 holds every float32/16 value exactly, so no difference is rounded away
        flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        differs = not torch.equal(flat, reference)
    return not any_across_ranks(ctx, [differs])[0]


def wrap_model(model, ctx, sync_bn=False, find_unused_parameters=False):
    """SyncBatchNorm (GPU only) and DistributedDataParallel for a multi-process run
    (`find_unused_parameters` for models that leave some parameters out of a step)."""
    if sync_bn:
        if ctx.device.type != "cuda":
            raise ConfigError("SOLVER.SYNC_BN needs CUDA devices (SyncBatchNorm has no CPU kernel); set it to false")
        if ctx.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def unwrap_model(model):
    """The plain module under torch.compile and DDP wrappers (its state_dict has clean keys)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model
