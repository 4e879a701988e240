"""Forward+backward time of almostlinear's poly_attention vs F.scaled_dot_product_attention on this machine.

    python benchmarks/attention.py                    # n = 1k .. 64k (SDPA up to --sdpa-max-n), causal + not
    python benchmarks/attention.py --max-n 16384      # quicker
    python benchmarks/attention.py --memory-only      # peak memory at B=1, H=8, n=32768

Each point runs in a fresh subprocess (so ru_maxrss is that point's peak resident memory); the time is the
minimum over --repeats runs after one warm-up.  Writes benchmarks/results/attention.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def worker(impl: str, n: int, causal: bool, B: int, H: int, d: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from almostlinear.kernels import poly_attention
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for _ in range(3))
    scale = 1 / math.sqrt(d)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        else:
            o = poly_attention(q, k, v, scale=scale, causal=causal)
        o.backward(torch.ones_like(o))
        q.grad = k.grad = v.grad = None

    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(time=min(times[1:]) if len(times) > 1 else times[0], times=times, maxrss_mb=rss / 1024,
                base_rss_mb=rss0 / 1024)


def run_point(impl, n, causal, B, H, d, repeats, threads, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(n), str(int(causal)), str(B), str(H),
           str(d), str(repeats), str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode:
            return dict(error=p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc={p.returncode}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout {timeout}s")


def slope(ns, ts):
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t and n >= 4096]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def flop_limit(n, d, causal, rank, dv=None):
    """SDPA fwd+bwd FLOPs (4 n^2 d fwd, 2x that bwd; half if causal) over the op's [n, r] x [r, dv+1] matmuls
    (non-causal 6: state and query forward, then dphi_q, dstate, dX, dphi_k with the forward's state kept;
    causal 7: the running states are rebuilt) plus the intra-chunk work: the speed-up at equal FLOP rates."""
    dv = dv or d
    sdpa = 12 * n * n * d * (0.5 if causal else 1.0)
    ours = (7 if causal else 6) * 2 * n * rank * (dv + 1) + (2 * 6 * n * 128 * d if causal else 0)
    return sdpa / ours


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    ap.add_argument("--min-n", type=int, default=1024)
    ap.add_argument("--max-n", type=int, default=65536)
    ap.add_argument("--sdpa-max-n", type=int, default=65536, help="skip SDPA above this n (it is quadratic)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--poly-repeats", type=int, default=0,
                    help="runs per point of the op (0: --repeats); more runs make the minimum robust to a busy "
                         "machine at little cost, the op being the fast side")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tag", default="attention", help="output file stem in benchmarks/results")
    ap.add_argument("--memory-impls", default="poly,sdpa", help="which impls the memory points run")
    a = ap.parse_args()
    if a.worker:
        impl, n, causal, B, H, d, repeats, threads = a.worker[0], *map(int, a.worker[1:])
        print(json.dumps(worker(impl, n, bool(causal), B, H, d, repeats, threads)))
        return
    import torch
    from almostlinear.kernels import feature_rank
    os.makedirs(RESULTS, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        machine = f"{model}, {os.cpu_count()} cores"
    except OSError:
        pass
    header = (f"machine: {machine}; torch {torch.__version__}; threads {a.threads or torch.get_num_threads()}; "
              f"date {datetime.datetime.now().isoformat(timespec='minutes')}; d={a.d}, B=H=1, fwd+bwd, "
              f"min of {a.poly_repeats or a.repeats} (op) / {a.repeats} (SDPA) runs after a warm-up")
    print(header, flush=True)
    rows = []
    if not a.memory_only:
        ns = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if a.min_n <= n <= a.max_n]
        for causal in (False, True):
            for n in ns:
                row = dict(causal=causal, n=n)
                for impl in ("poly", "sdpa"):
                    if impl == "sdpa" and n > a.sdpa_max_n:
                        continue
                    repeats = a.poly_repeats or a.repeats if impl == "poly" else a.repeats
                    r = run_point(impl, n, causal, 1, 1, a.d, repeats, a.threads, a.timeout)
                    row[impl] = r.get("time")
                    row[impl + "_rss_mb"] = r.get("maxrss_mb")
                    if "error" in r:
                        row[impl + "_error"] = r["error"]
                row["speedup"] = row["sdpa"] / row["poly"] if row.get("sdpa") and row.get("poly") else None
                row["flop_limit"] = flop_limit(n, a.d, causal, feature_rank(a.d, 2))
                rows.append(row)
                print(f"causal={causal!s:5} n={n:6d} poly={_fmt(row.get('poly'))} s  sdpa={_fmt(row.get('sdpa'))} s  "
                      f"speedup={_fmt(row['speedup'])}x  flop-limit={row['flop_limit']:.1f}x "
                      f"{row.get('poly_error', '')}{row.get('sdpa_error', '')}", flush=True)
    mem = []
    if not a.no_memory:
        for causal in (False, True):
            for impl in a.memory_impls.split(","):
                r = run_point(impl, 32768, causal, 1, 8, a.d, 0, a.threads, a.timeout)
                mem.append(dict(impl=impl, causal=causal, **{k: r.get(k) for k in ("maxrss_mb", "base_rss_mb",
                                                                                     "time", "error")}))
                print(f"memory B=1 H=8 n=32768 causal={causal} {impl}: peak RSS {_fmt(r.get('maxrss_mb'))} MB "
                      f"(time {_fmt(r.get('time'))} s) {r.get('error', '')}", flush=True)
    write(a, header, rows, mem)


def _fmt(x):
    return "-" if x is None else (f"{x:.3f}" if x < 100 else f"{x:.0f}")


def write(a, header, rows, mem):
    stem = os.path.join(RESULTS, a.tag)
    lines = ["# poly_attention vs SDPA (CPU)\n", header + "\n"]
    if rows:
        lines += ["| causal | n | poly fwd+bwd (s) | SDPA fwd+bwd (s) | speed-up | FLOP-count limit |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['causal']} | {r['n']} | {_fmt(r.get('poly'))} | {_fmt(r.get('sdpa'))} | "
                         f"{_fmt(r.get('speedup'))} | {r['flop_limit']:.1f} |")
        lines.append("")
        for causal in (False, True):
            rs = [r for r in rows if r["causal"] == causal]
            for impl in ("poly", "sdpa"):
                pts = [(r["n"], r[impl]) for r in rs if r.get(impl)]
                if pts:
                    lines.append(f"- causal={causal} {impl}: fitted log-log slope (n >= 4096) "
                                 f"{slope(*zip(*pts)):.2f}")
            t = {r["n"]: r.get("poly") for r in rs}
            if t.get(16384) and t.get(32768):
                lines.append(f"- causal={causal} poly time 16k -> 32k: x{t[32768] / t[16384]:.2f}")
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(7, 5))
            for causal, ls in ((False, "-"), (True, "--")):
                rs = [r for r in rows if r["causal"] == causal]
                for impl, c in (("poly", "C0"), ("sdpa", "C3")):
                    pts = [(r["n"], r[impl]) for r in rs if r.get(impl)]
                    if pts:
                        x, y = zip(*pts)
                        ax.loglog(x, y, ls, color=c, marker="o",
                                  label=f"{impl} {'causal' if causal else 'non-causal'} (slope {slope(x, y):.2f})")
            ax.set_xlabel("sequence length n")
            ax.set_ylabel("fwd+bwd time (s)")
            ax.set_title("poly_attention (degree 2) vs SDPA, d=%d, B=H=1" % a.d)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.text(0.01, 0.01, header[:150], fontsize=6)
            fig.savefig(stem + ".png", dpi=120)
        except Exception as e:  # pragma: no cover
            lines.append(f"(plot failed: {e})")
    if mem:
        lines += ["", "Peak resident memory, B=1, H=8, n=32768, d=%d, fwd+bwd (fresh process):" % a.d, "",
                  "| impl | causal | peak RSS (MB) | time (s) |", "|---|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['impl']} | {m['causal']} | {_fmt(m.get('maxrss_mb'))} | {_fmt(m.get('time'))} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
