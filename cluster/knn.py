"""Exact k-nearest neighbours of a feature set within itself (the k-reciprocal search).

``nearest_neighbours(x [N, D], k)`` -> int64 CPU tensor [N, k]: row i holds i itself, then
its k - 1 nearest other rows by increasing squared Euclidean distance
``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` (float32), equal distances ordered by row index. This is
the contract of an exact L2 index searched with k results (faiss ``IndexFlatL2``, what the
reference clustering code uses), with two rules made explicit: the item itself comes first
(its distance is zero; a duplicate of it follows), and ties go to the smaller index.

Backends:

* ``"torch"`` (default), on the CPU or a GPU. The [N, N] products are computed once per
  pair of row blocks (B equal blocks of b rows, b^2 * 16 bytes within ``memory_mb``), the
  block and its transpose each serving their own rows, so the work is (B + 1) / 2B of the
  N^2 D multiply-adds; a running top-(k + 1) per row is kept. On the CPU the products go
  through numpy's BLAS (OpenBLAS in the numpy wheels) limited to torch's thread count: the
  MKL inside the torch wheels does not use its fast float32 GEMM kernels on AMD processors
  (on this project's 2-core AMD EPYC test machine OpenBLAS ran 1.5x faster). When a
  row's k-th and (k + 1)-th distances are equal the tie may reach further, and that row is
  recomputed in full and sorted stably by its recomputed distances.
* ``"faiss"``: faiss's ``IndexFlatL2`` (its GPU version when the device is CUDA and faiss has
  GPU support), returned as faiss orders it. faiss is optional and imported only here.
"""
import math

import torch
from threadpoolctl import threadpool_limits

from utils.errors import ConfigError

BACKENDS = ("torch", "faiss")
DEFAULT_MEMORY_MB = 256


def _features(x, k):
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("features must be a non-empty [N, D] matrix, got shape %s" % (tuple(x.shape),))
    if not x.dtype.is_floating_point:
        raise ValueError("features must be floating point, got %s" % x.dtype)
    if not 1 <= int(k) <= x.shape[0]:
        raise ValueError("k=%d neighbours need at least %d feature rows, got %d" % (int(k), int(k), x.shape[0]))
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def _merge(best_d, best_i, d, cols, width):
    """Keep the `width` smallest of the current and the new candidates of some rows."""
    top_d, pos = torch.topk(torch.cat([best_d, d], 1), width, dim=1, largest=False, sorted=False)
    return top_d, torch.cat([best_i, cols], 1).gather(1, pos)


def _block_candidates(d, width):
    return torch.topk(d, min(width, d.shape[1]), dim=1, largest=False, sorted=False)


def block_pairs(n, memory_mb=DEFAULT_MEMORY_MB):
    """(block, [(a, ea, b, eb), ...]): the row block size of the torch search over n rows and
    the pairs of row ranges whose products it computes, each unordered pair once (b >= a)."""
    largest = max(1, int(math.sqrt(memory_mb * (1 << 20) / 16)))
    # equal blocks: a short last block would cost a full block's share of the pairs
    block = -(-n // -(-n // largest))
    starts = list(range(0, n, block))
    return block, [(a, min(a + block, n), b, min(b + block, n)) for a in starts for b in starts if b >= a]


def products(rows, cols):
    """[R, C] float32 products rows @ cols.T of [R, D] and [C, D], on the CPU through numpy's
    BLAS (module docstring; its thread count is the caller's to limit). The rounding of an
    entry may depend on R and C (BLAS picks its kernels by shape): a tied row's recomputation
    ranks its own recomputed distances."""
    if rows.device.type != "cpu":
        return rows @ cols.T
    return torch.from_numpy(rows.numpy() @ cols.numpy().T)


def _torch_search(x, k, memory_mb):
    if x.device.type == "cpu":
        # numpy's BLAS keeps its own thread pool: held to torch's count for the whole search
        with threadpool_limits(torch.get_num_threads(), user_api="blas"):
            return _search_blocks(x, k, memory_mb)
    return _search_blocks(x, k, memory_mb)


def _search_blocks(x, k, memory_mb):
    n, dev = x.shape[0], x.device
    width = min(k + 1, n)
    norms = (x * x).sum(1)
    block, pairs = block_pairs(n, memory_mb)
    best_d = torch.full((n, width), float("inf"), device=dev)
    best_i = torch.full((n, width), -1, dtype=torch.int64, device=dev)
    for a, ea, b, eb in pairs:
        d = (norms[a:ea, None] + norms[None, b:eb]).sub_(products(x[a:ea], x[b:eb]), alpha=2)
        if a == b:
            # the item itself first, whatever rounding does to its zero distance
            d.fill_diagonal_(float("-inf"))
        top_d, pos = _block_candidates(d, width)
        best_d[a:ea], best_i[a:ea] = _merge(best_d[a:ea], best_i[a:ea], top_d, pos + b, width)
        if a != b:
            top_d, pos = _block_candidates(d.T, width)
            best_d[b:eb], best_i[b:eb] = _merge(best_d[b:eb], best_i[b:eb], top_d, pos + a, width)
    # order by (distance, index): a stable sort by distance of the index-sorted candidates
    best_i, by_index = torch.sort(best_i, dim=1)
    best_d = best_d.gather(1, by_index)
    best_d, by_dist = torch.sort(best_d, dim=1, stable=True)
    best_i = best_i.gather(1, by_dist)
    if width > k:
        tied = torch.nonzero(best_d[:, k - 1] == best_d[:, k]).flatten()
        for s in range(0, len(tied), block):
            rows = tied[s:s + block]
            d = (norms[rows, None] + norms[None, :]).sub_(products(x[rows], x), alpha=2)
            d[torch.arange(len(rows), device=dev), rows] = float("-inf")
            best_i[rows, :k] = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return best_i[:, :k]


def _faiss_search(x, k, device):
    try:
        import faiss
    except ImportError:
        raise ConfigError("the faiss kNN backend needs the faiss package (faiss-cpu or faiss-gpu), which is not "
                          "installed; install it or use the torch backend (USL.CLUSTER.KNN_BACKEND torch)") from None
    data = x.cpu().contiguous().numpy()
    index = faiss.IndexFlatL2(data.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    index.add(data)
    _, found = index.search(data, k)
    return torch.from_numpy(found).long()


def nearest_neighbours(features, k, backend="torch", device=None, memory_mb=DEFAULT_MEMORY_MB):
    """[N, k] int64 CPU tensor of each row's k nearest rows, itself first (module docstring).

    features: [N, D] floating point (numpy or torch), computed in float32; device: where the
    torch backend computes (default: the features' device); memory_mb: its block budget.
    """
    x = _features(features, k)
    if backend not in BACKENDS:
        raise ConfigError("kNN backend must be one of %s, got %r (USL.CLUSTER.KNN_BACKEND)"
                          % (", ".join(BACKENDS), backend))
    device = torch.device(device) if device is not None else x.device
    if backend == "faiss":
        return _faiss_search(x, int(k), device)
    with torch.no_grad():
        return _torch_search(x.to(device), int(k), memory_mb).cpu()
