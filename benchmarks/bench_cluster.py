"""Speed and memory of the pseudo-labelling step (kNN + k-reciprocal Jaccard + DBSCAN) against
the dense numpy reference (tests/reference_jaccard.py), on synthetic clustered features.

Features: N L2-normalised rows of D = 3072 (SYSU-MM01's 4 x 768 tokens), about 56 images per
identity (SYSU's RGB training set: 22,258 images of 395 identities). An identity's centre is
its group's direction plus ``--spread`` times its own (groups of 8 similar identities), and
each image adds isotropic noise of norm ``--noise``: with the defaults DBSCAN at eps 0.6
finds about one cluster per identity with a few percent of outliers and some confusions, not
a trivially separable problem. Rows come in random order.

Each measurement runs in a fresh process (the same features from the same seed):

* ``implementation``: cluster.knn.nearest_neighbours -> cluster.jaccard (weights, query
  expansion, overlaps kept within eps) -> cluster.dbscan, as cluster.pseudo_labels runs them;
  on ``--device cuda`` the same code on the GPU;
* ``reference``: tests/reference_jaccard.py, dense numpy (an exact float32 L2 search with
  numpy's BLAS, the per-image loops, dense [N, N] float32 matrices) and sklearn's DBSCAN on
  the dense matrix.

Per stage (knn, jaccard, dbscan) it records wall and process CPU time, and for the
implementation also, after the step and outside its total, the time of the float32 products
alone that its exact search computes (``exact_products``: each pair of row blocks once, about
half of the N^2 D multiply-adds). No exact search that computes them can beat the reference
by more than the reference's total over that time (``speedup.*_bound_exact_products``).
Memory is the peak resident set size of the step above the process's size just before it
(features and imports already loaded; the kernel's peak counter is reset there), plus the
absolute peak; on CUDA also torch's peak allocated GPU memory. tracemalloc is not used: it
does not see torch's allocator and slows the reference's Python loops. The labels of both runs are compared
exactly, and the pseudo-label quality against the synthetic identities (NMI, ARI) is shown.

The reference needs about 12 N^2 bytes (5.9 GB at N = 22,258) and minutes. It runs at a size
only when the machine's available memory exceeds ``1.5 x 12 N^2`` bytes plus the features;
otherwise the JSON says so and the reference is measured at the largest ``--fallback-sizes``
entry that fits, never extrapolated into a measured figure. A run that fails is recorded with
its exit status.

    python benchmarks/bench_cluster.py [--sizes 4000 22258] [--reference-sizes ...] [--threads 1]
        [--device cpu|cuda] [--eps 0.6] [--output bench_cluster.json]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_IDENTITY = 56
GROUP = 8
TARGET_SPEEDUP = 10.0
TARGET_PEAK_MB = 1536.0
REFERENCE_BYTES_PER_PAIR = 12


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/self/status" % field)


def _reset_peak():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current size; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synthetic_features(n, dim, seed, spread, noise):
    """[n, dim] float32 unit rows and their identity labels (module docstring)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    ids = max(1, round(n / PER_IDENTITY))
    groups = max(1, ids // GROUP)
    group_dir = F.normalize(torch.randn(groups, dim, generator=g), dim=1)
    own = F.normalize(torch.randn(ids, dim, generator=g), dim=1)
    centres = F.normalize(group_dir[torch.randint(0, groups, (ids,), generator=g)] + spread * own, dim=1)
    labels = torch.randint(0, ids, (n,), generator=g)
    x = torch.empty(n, dim)
    for s in range(0, n, 4096):
        e = min(s + 4096, n)
        x[s:e] = F.normalize(centres[labels[s:e]] + noise * torch.randn(e - s, dim, generator=g) / dim ** 0.5, dim=1)
    return x, labels.numpy()


def _stage(times, name, fn, sync):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    times[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    return out


def worker(args):
    """One measurement in this process; prints one JSON line, writes the labels to args.labels_out."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    torch.set_num_threads(args.threads)
    x, truth = synthetic_features(args.n, args.dim, args.seed, args.spread, args.noise)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {}
    if args.impl == "implementation":
        from cluster.dbscan import dbscan_labels
        from cluster.jaccard import jaccard_from_weights, kreciprocal_weights
        from cluster.knn import nearest_neighbours
        from evaluation.kreciprocal import query_expansion

        if cuda:
            x = x.to(device)
            torch.cuda.reset_peak_memory_stats(device)
        budget = int(args.memory_mb * (1 << 20))
        baseline, resettable = _kib("VmRSS"), _reset_peak()
        with torch.no_grad():
            nbr = _stage(times, "knn", lambda: nearest_neighbours(x, args.k1, device=device,
                                                                  memory_mb=args.memory_mb).to(device), sync)

            def jaccard():
                v = kreciprocal_weights(x, nbr, args.k1, args.memory_mb)
                v = query_expansion(v, nbr, args.k2, max(1, budget // 40))
                return jaccard_from_weights(v, args.eps, args.memory_mb)

            sparse = _stage(times, "jaccard", jaccard, sync)
        labels = _stage(times, "dbscan", lambda: dbscan_labels(sparse, args.eps), sync)
        extra = {"stored_pairs_per_row": len(sparse.values) / args.n}
        if cuda:
            extra["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        from reference_jaccard import reference_dbscan, reference_initial_rank, reference_jaccard

        xn = x.numpy()
        baseline, resettable = _kib("VmRSS"), _reset_peak()
        rank = _stage(times, "knn", lambda: reference_initial_rank(xn, args.k1), sync)
        dense = _stage(times, "jaccard", lambda: reference_jaccard(xn, args.k1, args.k2, initial_rank=rank), sync)
        labels = _stage(times, "dbscan", lambda: reference_dbscan(dense, args.eps), sync)
        extra = {}
    peak = _kib("VmHWM")
    if args.impl == "implementation":
        from cluster.knn import block_pairs, products

        def exact_products():
            for a, ea, b, eb in block_pairs(args.n, args.memory_mb)[1]:
                products(x[a:ea], x[b:eb])

        floor = {}
        _stage(floor, "products", exact_products, sync)
        extra["exact_products"] = floor["products"]
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    np.save(args.labels_out, labels)
    total = {k: sum(t[k] for t in times.values()) for k in ("wall_s", "cpu_s")}
    print(json.dumps({
        "stages": times, "total": total,
        "peak_rss_above_start_mb": (peak - baseline) / 1024 if resettable else None,
        "peak_rss_mb": peak / 1024, "rss_at_start_mb": baseline / 1024, "peak_counter_reset": resettable,
        "num_clusters": int(labels.max(initial=-1)) + 1, "num_outliers": int((labels == -1).sum()),
        "nmi_vs_identities": float(normalized_mutual_info_score(truth, labels)),
        "ari_vs_identities": float(adjusted_rand_score(truth, labels)), **extra}))


def _available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _reference_fits(n, dim):
    need = 1.5 * REFERENCE_BYTES_PER_PAIR * n * n + 4 * n * dim
    return _available_bytes() >= need, need


def _run(impl, n, args, device, tmp):
    out = os.path.join(tmp, "%s_%d.npy" % (impl, n))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--n", str(n), "--labels-out", out,
           "--device", device]
    for key in ("dim", "seed", "spread", "noise", "k1", "k2", "eps", "threads", "memory_mb"):
        cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"failed": True, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}, None
    import numpy as np

    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 22258])
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=None,
                        help="sizes at which to run the reference (default: all --sizes, memory permitting)")
    parser.add_argument("--fallback-sizes", type=int, nargs="*", default=[16000, 12000, 8000],
                        help="where to measure the reference instead when a size does not fit in memory")
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.55, help="identity centre: group direction + spread x own")
    parser.add_argument("--noise", type=float, default=2.5, help="norm of each image's isotropic noise")
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1, help="torch, OpenMP and BLAS threads of both sides")
    parser.add_argument("--memory-mb", type=float, default=256, help="the implementation's temporaries budget")
    parser.add_argument("--device", default="cpu", help="the implementation's device (cpu, cuda)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--worker", choices=["implementation", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.impl = args.worker
        return worker(args)

    import numpy as np
    import sklearn
    import torch

    ref_sizes = args.sizes if args.reference_sizes is None else args.reference_sizes
    report = {
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/bench_cluster.py"] + (argv or sys.argv[1:])),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "scikit-learn": sklearn.__version__, "cpu": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "threads": args.threads, "device": args.device,
                        "cuda_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                        "load_average_at_start": os.getloadavg()},
        "params": {k: getattr(args, k) for k in ("dim", "seed", "spread", "noise", "k1", "k2", "eps", "memory_mb")},
        "targets": {"speedup_at_least": TARGET_SPEEDUP, "peak_below_mb": TARGET_PEAK_MB},
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            case = {"n": n}
            case["implementation"], labels = _run("implementation", n, args, args.device, tmp)
            ref_n = None
            if n in ref_sizes:
                fits, need = _reference_fits(n, args.dim)
                if fits:
                    ref_n = n
                else:
                    case["reference_skipped"] = ("needs about %.1f GB, %.1f GB available"
                                                 % (need / 1e9, _available_bytes() / 1e9))
                    ref_n = next((m for m in sorted(args.fallback_sizes, reverse=True)
                                  if m < n and _reference_fits(m, args.dim)[0]), None)
            if ref_n is not None:
                reference, ref_labels = _run("reference", ref_n, args, "cpu", tmp)
                case["reference"] = dict(reference, n=ref_n)
                if ref_n != n:
                    case["reference_note"] = "the reference was measured at N=%d, not at N=%d" % (ref_n, n)
                    own, own_labels = _run("implementation", ref_n, args, args.device, tmp)
                    case["implementation_at_reference_n"] = own
                    labels = own_labels
                if labels is not None and ref_labels is not None:
                    case["labels_identical"] = bool(np.array_equal(labels, ref_labels))
                    mine = case["implementation"] if ref_n == n else case["implementation_at_reference_n"]
                    case["speedup"] = {}
                    for clock in ("wall", "cpu"):
                        key = clock + "_s"
                        ref_t, own_t = reference["total"][key], mine["total"][key]
                        ref_knn, own_knn = reference["stages"]["knn"][key], mine["stages"]["knn"][key]
                        case["speedup"].update({clock: ref_t / own_t, clock + "_knn": ref_knn / own_knn,
                                                clock + "_excluding_knn": (ref_t - ref_knn) / (own_t - own_knn)})
                        if "exact_products" in mine:
                            case["speedup"][clock + "_bound_exact_products"] = ref_t / mine["exact_products"][key]
                    if ref_n == n:
                        case["targets_met"] = {
                            "speedup_wall": case["speedup"]["wall"] >= TARGET_SPEEDUP,
                            "speedup_cpu": case["speedup"]["cpu"] >= TARGET_SPEEDUP,
                            "peak_rss": mine["peak_rss_mb"] < TARGET_PEAK_MB,
                        }
            report["cases"].append(case)
            print("N=%d done" % n, file=sys.stderr, flush=True)
    report["environment"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
