"""Forward+backward time of almostlinear's poly_attention vs F.scaled_dot_product_attention on this machine.

    python benchmarks/attention.py                    # default threads, d = 64 and 128, n = 1k .. 64k, causal + not
    python benchmarks/attention.py --threads 1 --tag attention_1thread
    python benchmarks/attention.py --max-n 16384      # quicker
    python benchmarks/attention.py --memory-only      # peak memory at B=1, H=8, n=32768
    python benchmarks/attention.py --window 64        # also the op with an exact window of 64 keys

Each point (d, causal, n) runs in a fresh subprocess that times the op, SDPA and, with --backend, the op
reached through the backend (a function calling SDPA, compiled with method="polynomial", min_seq_len=0),
with --window W the op with an exact window (poly_window_attention, exact_window=W), interleaved: run 1 of each, run 2 of each, ... after one warm-up each, so that a drift of the machine's speed
hits every side alike; the table gives the minimum and the median.  Memory points run one implementation per
fresh process (ru_maxrss is its peak resident memory).  Writes benchmarks/results/<tag>.{md,csv,png}.
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
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
IMPLS = ("poly", "sdpa", "backend")


def _step_functions(impls, q, k, v, causal, scale):
    """impl -> a function running forward + backward once."""
    import torch
    import torch.nn.functional as F
    from almostlinear.kernels import poly_attention, poly_window_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    attend = {"sdpa": sdpa, "poly": lambda q, k, v: poly_attention(q, k, v, scale=scale, causal=causal)}
    for i in impls:
        if i.startswith("window:"):  # the op with an exact window of W keys
            attend[i] = (lambda W: lambda q, k, v: poly_window_attention(q, k, v, scale=scale, causal=causal,
                                                                         exact_window=W))(int(i.split(":")[1]))
    if "backend" in impls:
        import almostlinear
        backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="aot_eager")
        attend["backend"] = torch.compile(sdpa, backend=backend, dynamic=False)

    def step(fn):
        def run():
            o = fn(q, k, v)
            o.backward(torch.ones_like(o))
            q.grad = k.grad = v.grad = None
        return run
    return {i: step(attend[i]) for i in impls}


def worker(impls, n, causal, B, H, d, repeats, threads) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for _ in range(3))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = _step_functions(impls, q, k, v, causal, 1 / math.sqrt(d))
    times = {i: [] for i in impls}
    for r in range(repeats + 1):  # run 0: warm-up (and the backend's compile)
        for i in impls:
            t = time.perf_counter()
            steps[i]()
            if r:
                times[i].append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = dict(maxrss_mb=rss / 1024, base_rss_mb=rss0 / 1024, threads=torch.get_num_threads())
    for i, ts in times.items():
        out[i] = dict(min=min(ts), median=statistics.median(ts), times=ts) if ts else dict(min=None, median=None)
    return out


def run_point(impls, n, causal, B, H, d, repeats, threads, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(impls), str(n), str(int(causal)), str(B),
           str(H), str(d), str(repeats), str(threads)]
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


def flop_limit(n, d, causal, rank, dv=None, chunk=128):
    """SDPA fwd+bwd FLOPs (4 n^2 d fwd, 2x that bwd; half if causal) over the op's [n, r] x [r, dv] matmuls
    (non-causal 6: state and query forward, then dphi_q, dstate, dX, dphi_k with the forward's state kept;
    causal 7: the running states are rebuilt; the denominator's moments are d-space products, not counted)
    plus the intra-chunk work: the speed-up at equal FLOP rates."""
    dv = dv or d
    sdpa = 12 * n * n * d * (0.5 if causal else 1.0)
    ours = (7 if causal else 6) * 2 * n * rank * dv + (2 * 6 * n * chunk * d if causal else 0)
    return sdpa / ours


def _machine():
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        machine = f"{model}, {os.cpu_count()} cores"
    except OSError:
        pass
    return machine


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    ap.add_argument("--min-n", type=int, default=1024)
    ap.add_argument("--max-n", type=int, default=65536)
    ap.add_argument("--sdpa-max-n", type=int, default=32768, help="skip SDPA above this n (it is quadratic)")
    ap.add_argument("--d", default="64,128", help="head dims, comma separated")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and point")
    ap.add_argument("--backend", action="store_true", help="also time the op through the backend")
    ap.add_argument("--window", type=int, default=0, help="also time the op with this exact window (0: no)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tag", default="attention", help="output file stem in benchmarks/results")
    ap.add_argument("--memory-impls", default="poly,sdpa", help="which impls the memory points run")
    return ap.parse_args()


def main():
    a = _args()
    if a.worker:
        impls, (n, causal, B, H, d, repeats, threads) = a.worker[0].split(","), map(int, a.worker[1:])
        print(json.dumps(worker(impls, n, bool(causal), B, H, d, repeats, threads)))
        return
    import torch
    from almostlinear.kernels.features import fast_rank
    os.makedirs(RESULTS, exist_ok=True)
    ds = [int(x) for x in a.d.split(",")]
    header = (f"machine: {_machine()}; torch {torch.__version__}; threads {a.threads or torch.get_num_threads()}; "
              f"date {datetime.datetime.now().isoformat(timespec='minutes')}; B=H=1, fwd+bwd, {a.repeats} runs of "
              f"each implementation interleaved in one process after a warm-up; min (median)")
    print(header, flush=True)
    rows = []
    if not a.memory_only:
        ns = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if a.min_n <= n <= a.max_n]
        for d in ds:
            for causal in (False, True):
                for n in ns:
                    rows.append(_measure(a, d, causal, n, fast_rank(d, 2)))
    mem = []
    if not a.no_memory:
        for causal in (False, True):
            for impl in a.memory_impls.split(","):
                r = run_point([impl], 32768, causal, 1, 8, ds[0], 0, a.threads, a.timeout)
                mem.append(dict(impl=impl, causal=causal, **{k: r.get(k) for k in ("maxrss_mb", "base_rss_mb",
                                                                                     "error")}))
                print(f"memory B=1 H=8 n=32768 causal={causal} {impl}: peak RSS {_fmt(r.get('maxrss_mb'))} MB "
                      f"{r.get('error', '')}", flush=True)
    write(a, header, rows, mem)


def _measure(a, d, causal, n, rank):
    """One table row: run the point and print it."""
    impls = [i for i in IMPLS if (i != "sdpa" or n <= a.sdpa_max_n) and (i != "backend" or a.backend)]
    impls += [f"window:{a.window}"] if a.window else []
    r = run_point(impls, n, causal, 1, 1, d, a.repeats, a.threads, a.timeout)
    row = dict(d=d, causal=causal, n=n, error=r.get("error", ""), flop_limit=flop_limit(n, d, causal, rank))
    for i in IMPLS + ("window",):
        for stat in ("min", "median"):
            row[f"{i}_{stat}"] = (r.get(f"window:{a.window}" if i == "window" else i) or {}).get(stat)
    for stat in ("min", "median"):
        w, p = row.get(f"window_{stat}"), row.get(f"poly_{stat}")
        row[f"window_cost_{stat}"] = w / p if w and p else None
    for i in ("poly", "backend"):
        for stat in ("min", "median"):
            s, p = row.get(f"sdpa_{stat}"), row.get(f"{i}_{stat}")
            row[f"{i}_speedup_{stat}"] = s / p if s and p else None
    print(f"d={d} causal={causal!s:5} n={n:6d} " + "  ".join(
        f"{i}={_fmt(row[i.split(':')[0] + '_min'])} ({_fmt(row[i.split(':')[0] + '_median'])}) s" for i in impls) +
        f"  speed-up={_fmt(row['poly_speedup_min'])}x ({_fmt(row['poly_speedup_median'])}x)"
        f"  flop-limit={row['flop_limit']:.1f}x {row['error']}"
        + (f"  window/poly={_fmt(row['window_cost_min'])} ({_fmt(row['window_cost_median'])})" if a.window else ""),
        flush=True)
    return row


def _fmt(x):
    return "-" if x is None else (f"{x:.3f}" if x < 100 else f"{x:.0f}")


def _pair(row, key):
    return f"{_fmt(row.get(key + '_min'))} ({_fmt(row.get(key + '_median'))})"


def write(a, header, rows, mem):
    stem = os.path.join(RESULTS, a.tag)
    lines = ["# poly_attention vs SDPA (CPU)\n", header + "\n"]
    if rows:
        backend = a.backend
        cols = ["d", "causal", "n", "poly fwd+bwd (s)", "SDPA fwd+bwd (s)", "speed-up"]
        cols += ["backend fwd+bwd (s)", "speed-up (backend)"] if backend else []
        cols += [f"op + exact window {a.window} (s)", "window / op"] if a.window else []
        lines += ["| " + " | ".join(cols + ["FLOP-count limit"]) + " |", "|" + "---|" * (len(cols) + 1)]
        for r in rows:
            cells = [str(r["d"]), str(r["causal"]), str(r["n"]), _pair(r, "poly"), _pair(r, "sdpa"),
                     _pair(r, "poly_speedup")]
            cells += [_pair(r, "backend"), _pair(r, "backend_speedup")] if backend else []
            cells += [_pair(r, "window"), _pair(r, "window_cost")] if a.window else []
            lines.append("| " + " | ".join(cells + [f"{r['flop_limit']:.1f}"]) + " |")
        lines.append("")
        lines += _slopes(rows)
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        lines += _plot(rows, header, stem)
    if mem:
        lines += ["", "Peak resident memory, B=1, H=8, n=32768, fwd+bwd (fresh process):", "",
                  "| impl | causal | peak RSS (MB) |", "|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['impl']} | {m['causal']} | {_fmt(m.get('maxrss_mb'))} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _slopes(rows):
    lines = []
    for d in sorted({r["d"] for r in rows}):
        for causal in (False, True):
            rs = [r for r in rows if r["causal"] == causal and r["d"] == d]
            for impl in ("poly", "sdpa"):
                pts = [(r["n"], r[impl + "_min"]) for r in rs if r.get(impl + "_min") and r["n"] >= 4096]
                if len(pts) >= 2:  # a slope needs two lengths
                    lines.append(f"- d={d} causal={causal} {impl}: fitted log-log slope (n >= 4096, minima) "
                                 f"{slope(*zip(*pts)):.2f}")
    return lines


def _plot(rows, header, stem):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 5))
        for (d, causal), ls in zip([(d, c) for d in sorted({r["d"] for r in rows}) for c in (False, True)],
                                   ("-", "--", "-.", ":")):
            rs = [r for r in rows if r["causal"] == causal and r["d"] == d]
            for impl, c in (("poly", "C0"), ("sdpa", "C3")):
                pts = [(r["n"], r[impl + "_min"]) for r in rs if r.get(impl + "_min")]
                if pts:
                    x, y = zip(*pts)
                    ax.loglog(x, y, ls, color=c, marker="o", label=f"{impl} d={d} "
                              f"{'causal' if causal else 'non-causal'} (slope {slope(x, y):.2f})")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel("fwd+bwd time (s), minimum")
        ax.set_title("poly_attention (degree 2) vs SDPA, B=H=1")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, header[:150], fontsize=6)
        fig.savefig(stem + ".png", dpi=120)
    except Exception as e:  # pragma: no cover
        return [f"(plot failed: {e})"]
    return []


if __name__ == "__main__":
    main()
