"""Speed of evaluation.metrics.evaluate against the per-query loop reference (tests/reference_eval.py).

Synthetic L2-normalised features (identity centre + Gaussian noise) give float32 distance
matrices -(q @ g.T) at the sizes of the benchmarks' test sets; both evaluators run on the
same matrix in the same process, and the JSON printed on stdout holds, per case, the wall
and CPU (process) time of each, their ratios, the largest absolute difference between
their outputs (CMC, standard CMC, mAP, mINP) and the retrieval figures of the synthetic
data. CPU time is the steadier figure on a shared machine (both sides run on one thread by
default, OMP_NUM_THREADS included; the reference is numpy, single-threaded). Each side
keeps its fastest run: --repeat for the evaluator, --ref-repeat for the reference.

Cases: SYSU all-search single-shot (3803 x 301) and multi-shot (3803 x 3010), RegDB
(2060 x 2060), LLCM-like (8000 x 7000, at two noise levels) and Market-like (3368 x 15913),
plus "sysu_10_trials": the metric part of a full SYSU evaluation, 10 single-shot trials
sliced from one 3803 x (all candidates) matrix by evaluation.trials.evaluate_trials, and
"random_llcm": an untrained model's ranking (uniform random distances, 4000 x 3500, LLCM
protocol), where every match lies deep in its row.

``--contended N`` then times the evaluator on "random_llcm" alone, first on the idle machine
and then while N other processes keep cores busy (each spins for at most 5 minutes), in the
same process, and reports the ratio and whether the outputs are identical. Run it with
``--threads 2`` for torch's default pool on a 2-core machine.

    python benchmarks/bench_eval.py [--quick] [--threads 1] [--repeat 3] [--ref-repeat 2] [--contended N]
"""
import argparse
import json
import os
import platform
import sys
import time


# Set before torch loads: an OpenMP pool of the default size keeps its threads spinning on
# the other cores, which slowed the numpy reference by up to 2x on a 2-core machine.
_threads = argparse.ArgumentParser(add_help=False)
_threads.add_argument("--threads", type=int, default=1)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads.parse_known_args()[0].threads))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from reference_eval import reference_evaluate  # noqa: E402
from evaluation.trials import evaluate_trials  # noqa: E402
from evaluation.metrics import evaluate  # noqa: E402

DIM = 64
# Feature noise per case, chosen so the synthetic retrieval figures resemble published ones
# (SYSU Rank-1 ~75%, RegDB ~95%, LLCM ~60%, Market ~96%); "llcm_hard" is a weak model. The
# evaluator's time grows with the number of items ranked before each query's last match.
NOISE = {"sysu": 1.35, "regdb": 1.25, "llcm": 1.3, "llcm_hard": 1.5, "market": 1.0}


def features(rng, pids, centres, noise):
    f = centres[pids] + noise * rng.standard_normal((len(pids), DIM)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def distance(rng, q_pids, g_pids, n_ids, noise):
    """-(q @ g.T) float32; pid -1 (distractors) gets pure-noise features."""
    centres = np.concatenate([rng.standard_normal((n_ids, DIM)), np.zeros((1, DIM))]).astype(np.float32)
    qf = features(rng, np.where(q_pids < 0, n_ids, q_pids), centres, noise)
    gf = features(rng, np.where(g_pids < 0, n_ids, g_pids), centres, noise)
    return -(qf @ gf.T)


def sysu_gallery(rng, n_ids, shots, n_pairs=301):
    """n_pairs of the (identity, RGB camera) pairs, every identity in at least one camera,
    `shots` images each: 301 and 3010 images, the size of a SYSU all-search gallery."""
    pairs = np.arange(n_ids) * 4 + rng.integers(0, 4, n_ids)
    rest = np.setdiff1d(np.arange(n_ids * 4), pairs)
    pairs = np.sort(np.concatenate([pairs, rng.choice(rest, n_pairs - n_ids, replace=False)]))
    pids = np.repeat(pairs // 4, shots)
    cams = np.repeat(np.array([1, 2, 4, 5])[pairs % 4], shots)
    return pids, cams


def make_case(name, scale, rng):
    """(distmat, q_pids, g_pids, q_camids, g_camids, protocol)."""
    if name in ("sysu_single_shot", "sysu_multi_shot"):
        n_ids = 96
        g_pids, g_cams = sysu_gallery(rng, n_ids, 1 if name == "sysu_single_shot" else 10)
        nq = int(3803 * scale)
        q_pids, q_cams = rng.integers(0, n_ids, nq), rng.choice([3, 6], nq)
        return distance(rng, q_pids, g_pids, n_ids, NOISE["sysu"]), q_pids, g_pids, q_cams, g_cams, "sysu"
    if name == "regdb":
        n_ids = max(20, int(206 * scale))
        pids = np.repeat(np.arange(n_ids), 10)
        return (distance(rng, pids, pids, n_ids, NOISE["regdb"]), pids, pids, np.ones_like(pids),
                np.full_like(pids, 2), "regdb")
    if name.startswith("llcm_like"):
        n_ids, nq, ng = 351, int(8000 * scale), int(7000 * scale)
        q_pids, g_pids = rng.integers(0, n_ids, nq), rng.integers(0, n_ids, ng)
        q_cams, g_cams = rng.choice([1, 2, 4, 5, 6, 7, 8, 9], nq), rng.integers(1, 10, ng)
        noise = NOISE["llcm_hard" if name.endswith("hard") else "llcm"]
        return distance(rng, q_pids, g_pids, n_ids, noise), q_pids, g_pids, q_cams, g_cams, "llcm"
    if name == "random_llcm":
        nq, ng = int(4000 * scale), int(3500 * scale)
        q_pids, g_pids = rng.integers(0, 351, nq), rng.integers(0, 351, ng)
        q_cams, g_cams = rng.choice([1, 2, 4, 5, 6, 7, 8, 9], nq), rng.integers(1, 10, ng)
        return rng.random((nq, ng), dtype=np.float32), q_pids, g_pids, q_cams, g_cams, "llcm"
    if name == "market_like":
        n_ids, nq, ng = 751, int(3368 * scale), int(15913 * scale)
        q_pids = rng.integers(0, n_ids, nq)
        # about a third of the gallery are distractors (pid -1), as in Market-1501
        g_pids = np.where(rng.random(ng) < 0.35, -1, rng.integers(0, n_ids, ng))
        q_cams, g_cams = rng.integers(1, 7, nq), rng.integers(1, 7, ng)
        return distance(rng, q_pids, g_pids, n_ids, NOISE["market"]), q_pids, g_pids, q_cams, g_cams, "market"
    raise ValueError(name)


def timed(fn, repeat=1):
    """(result, best wall seconds, CPU seconds of that run)."""
    best = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[1]:
            best = (out, w, c)
    return best


def max_abs_diff(a, b):
    n = min(len(a["cmc"]), len(b["cmc"]))
    return float(max(np.abs(np.asarray(a["cmc"][:n]) - b["cmc"][:n]).max(),
                     np.abs(np.asarray(a["cmc_standard"][:n]) - b["cmc_standard"][:n]).max(),
                     abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"])))


def summary(fast, ref, t_fast, t_ref):
    diff = max_abs_diff(fast, ref)
    return dict(
        evaluator_s=round(t_fast[0], 4), evaluator_cpu_s=round(t_fast[1], 4),
        reference_s=round(t_ref[0], 4), reference_cpu_s=round(t_ref[1], 4),
        speedup=round(t_ref[0] / t_fast[0], 1), speedup_cpu=round(t_ref[1] / max(t_fast[1], 1e-9), 1),
        max_abs_diff=diff, identical_within_1e_6=bool(diff <= 1e-6 and fast["num_valid_queries"] == ref["num_valid_queries"]),
    )


def run_case(name, scale, repeat, ref_repeat, rng):
    dist, q_pids, g_pids, q_cams, g_cams, protocol = make_case(name, scale, rng)
    fast, tw, tc = timed(lambda: evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol), repeat)
    ref, rw, rc = timed(lambda: reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol), ref_repeat)
    out = dict(name=name, protocol=protocol, shape=list(dist.shape))
    out.update(summary(fast, ref, (tw, tc), (rw, rc)))
    out.update(rank1=round(float(fast["cmc"][0]), 4), mAP=round(fast["mAP"], 4), mINP=round(fast["mINP"], 4),
               num_valid_queries=fast["num_valid_queries"])
    if torch.cuda.is_available():
        d = torch.from_numpy(dist).cuda()
        labels = [torch.from_numpy(x).cuda() for x in (q_pids, g_pids, q_cams, g_cams)]
        evaluate(d, *labels, protocol=protocol)
        torch.cuda.synchronize()
        _, gw, _ = timed(lambda: (evaluate(d, *labels, protocol=protocol), torch.cuda.synchronize()), repeat)
        out["evaluator_cuda_s"] = round(gw, 4)
    return out


def run_sysu_trials(scale, repeat, ref_repeat, rng, n_trials=10):
    """10 single-shot trials drawn from all SYSU gallery candidates (5,207 images with seed 0)."""
    n_ids = 96
    per_pair = rng.integers(10, 25, size=(n_ids, 4)) * (rng.random((n_ids, 4)) < 0.78)
    g_pids = np.repeat(np.repeat(np.arange(n_ids), 4), per_pair.reshape(-1))
    g_cams = np.repeat(np.tile([1, 2, 4, 5], n_ids), per_pair.reshape(-1))
    nq = int(3803 * scale)
    q_pids, q_cams = rng.integers(0, n_ids, nq), rng.choice([3, 6], nq)
    dist = distance(rng, q_pids, g_pids, n_ids, NOISE["sysu"])
    start = np.cumsum(per_pair.reshape(-1)) - per_pair.reshape(-1)
    present = np.flatnonzero(per_pair.reshape(-1))
    trials = [start[present] + rng.integers(0, per_pair.reshape(-1)[present]) for _ in range(n_trials)]

    def fast_all():
        return evaluate_trials(dist, q_pids, g_pids, q_cams, g_cams, trials, "sysu")

    def reference_all():
        return [reference_evaluate(dist[:, t], q_pids, g_pids[t], q_cams, g_cams[t], "sysu") for t in trials]

    fast, tw, tc = timed(fast_all, repeat)
    ref, rw, rc = timed(reference_all, ref_repeat)
    diff = 0.0
    for rec, r in zip(fast["per_trial"], ref):
        diff = max(diff, float(np.abs(np.asarray(rec["cmc"]) - r["cmc"]).max()), abs(rec["mAP"] - r["mAP"]),
                   abs(rec["mINP"] - r["mINP"]))
    out = dict(name="sysu_10_trials", protocol="sysu", shape=list(dist.shape), trials=n_trials,
               gallery_per_trial=int(len(trials[0])))
    out.update(evaluator_s=round(tw, 4), evaluator_cpu_s=round(tc, 4), reference_s=round(rw, 4),
               reference_cpu_s=round(rc, 4), speedup=round(rw / tw, 1), speedup_cpu=round(rc / max(tc, 1e-9), 1),
               max_abs_diff=diff, identical_within_1e_6=bool(diff <= 1e-6),
               rank1_mean=round(fast["mean"]["rank1"], 4), mAP_mean=round(fast["mean"]["mAP"], 4))
    return out


SPIN = "import time\nt = time.time()\nwhile time.time() - t < 300:\n    pass\n"


def run_contended(scale, repeat, competitors, rng):
    """Idle and contended times of the evaluator on random_llcm, measured in this process."""
    import subprocess

    dist, q_pids, g_pids, q_cams, g_cams, protocol = make_case("random_llcm", scale, rng)

    def run():
        return evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol)

    run()
    idle, t_idle, _ = timed(run, repeat)
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(competitors)]
    try:
        time.sleep(1.0)
        busy, t_busy, _ = timed(run, repeat)
        worst = max(timed(run, 1)[1] for _ in range(repeat))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return dict(name="random_llcm_contended", competitors=competitors, threads=torch.get_num_threads(),
                idle_s=round(t_idle, 4), contended_best_s=round(t_busy, 4), contended_worst_s=round(worst, 4),
                ratio_best=round(t_busy / t_idle, 2), ratio_worst=round(worst / t_idle, 2),
                identical_outputs=bool(max_abs_diff(idle, busy) == 0.0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quarter-size problems (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="evaluator runs per case; the fastest is kept")
    parser.add_argument("--ref-repeat", type=int, default=2,
                        help="reference runs per case; the fastest is kept (a first run that touches "
                             "fresh memory can take twice as long)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contended", type=int, default=0, metavar="N",
                        help="also time random_llcm idle and under N busy processes (ratio in the JSON)")
    parser.add_argument("--cases", default="sysu_single_shot,sysu_multi_shot,regdb,llcm_like,llcm_like_hard,"
                                           "market_like,random_llcm,sysu_10_trials", help="comma-separated subset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    rng = np.random.default_rng(args.seed)
    results = []
    for name in args.cases.split(","):
        if name == "sysu_10_trials":
            results.append(run_sysu_trials(scale, args.repeat, args.ref_repeat, rng))
        else:
            results.append(run_case(name, scale, args.repeat, args.ref_repeat, rng))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.contended:
        results.append(run_contended(scale, args.repeat, args.contended, rng))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = dict(benchmark="bench_eval", quick=args.quick, threads=args.threads, repeat=args.repeat,
                  ref_repeat=args.ref_repeat, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                  torch=torch.__version__, numpy=np.__version__, cpu=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), cuda=torch.cuda.is_available(), cases=results)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
