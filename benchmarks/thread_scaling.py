"""How the op and SDPA scale with intra-op threads: fwd+bwd time at each thread count, interleaved in one process.

    python benchmarks/thread_scaling.py                       # n = 32768, d = 64, causal and not, threads 1,2
    python benchmarks/thread_scaling.py --impls poly --repeats 7

Round r runs every (threads, implementation) once, so a drift of the machine's speed hits all alike; the table
gives the minimum and the median of each, and the ratio time(most threads) / time(1 thread) of both (0.5 is
perfect scaling on 2 threads).  Writes benchmarks/results/thread_scaling.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from almostlinear.kernels import poly_attention

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _fwd_bwd(impl, q, k, v, causal):
    scale = 1 / math.sqrt(q.shape[-1])
    if impl == "poly":
        o = poly_attention(q, k, v, scale=scale, causal=causal)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    o.backward(torch.ones_like(o))
    q.grad = k.grad = v.grad = None


def measure(impls, threads, n, d, causal, repeats):
    """{(impl, threads): [seconds per fwd+bwd]}, B = H = 1."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    times = {(i, t): [] for i in impls for t in threads}
    for r in range(repeats + 1):  # round 0 warms up
        for t in threads:
            torch.set_num_threads(t)
            for i in impls:
                t0 = time.perf_counter()
                _fwd_bwd(i, q, k, v, causal)
                if r:
                    times[(i, t)].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="comma separated; the first is the baseline")
    ap.add_argument("--impls", default="poly,sdpa")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    threads = [int(x) for x in a.threads.split(",")]
    impls = a.impls.split(",")
    lines = ["# Thread scaling, fwd+bwd (CPU)\n",
             f"torch {torch.__version__}; {os.cpu_count()} cores; date {datetime.datetime.now():%Y-%m-%dT%H:%M}; "
             f"n={a.n}, d={a.d}, B=H=1; {a.repeats} rounds interleaved after a warm-up; min (median) seconds\n",
             "| causal | impl | " + " | ".join(f"{t} threads" for t in threads) +
             f" | {threads[-1]} / {threads[0]} threads |", "|---|---|" + "---|" * (len(threads) + 1)]
    for causal in (False, True):
        times = measure(impls, threads, a.n, a.d, causal, a.repeats)
        for i in impls:
            ts = [times[(i, t)] for t in threads]
            cells = [f"{min(x):.3f} ({statistics.median(x):.3f})" for x in ts]
            ratio = f"{min(ts[-1]) / min(ts[0]):.2f} ({statistics.median(ts[-1]) / statistics.median(ts[0]):.2f})"
            lines.append(f"| {causal} | {i} | " + " | ".join(cells) + f" | {ratio} |")
            print(lines[-1], flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "thread_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
