"""One training step (forward + backward + AdamW) of a small GPT at long context: eager, Inductor with
exact attention, and almostlinear (method="auto", Inductor inside), with the measured gradient error.

    python benchmarks/train_step.py                         # n = 2k, 4k, 8k, 16k; d = 64; ~10 min on 2 CPU cores
    python benchmarks/train_step.py --lengths 4096 16384 --layers 2 --device cuda

Prints a markdown table and writes benchmarks/results/train_step.{md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from pathlib import Path

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig, timed_step


def step_time(model, compiled, tokens, repeats: int, device: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):  # the first call compiles
        _, seconds = timed_step(compiled, optimizer, tokens, tokens, device)
        if i:
            times.append(seconds)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=8192, help="skip eager above this length (n^2 memory)")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step")
    args = parser.parse_args(argv)

    header = (f"machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}; torch {torch.__version__}; "
              f"date {datetime.datetime.now():%Y-%m-%d %H:%M}; GPT {args.layers} layers x {args.heads} heads of d="
              f"{args.head_dim}, batch 1, median of {args.repeats} steps after compile")
    print(header, flush=True)
    rows = []
    for n in args.lengths:
        config = GPTConfig(vocab_size=256, block_size=n, n_layer=args.layers, n_head=args.heads,
                           n_embd=args.heads * args.head_dim)
        tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0)).to(args.device)
        result = {"n": n}
        for name, options in (("eager", None), ("inductor exact", {"method": "exact"}),
                              ("almostlinear auto", {"method": "auto", "budget": args.budget})):
            if name == "eager" and n > args.eager_max:
                result[name] = None
                continue
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = GPT(config).to(args.device)
            backend = almostlinear.Backend(**options) if options else None
            compiled = torch.compile(model, backend=backend) if backend else model
            result[name] = step_time(model, compiled, tokens, args.repeats, args.device)
            if name.startswith("almostlinear"):
                report = backend.reports[-1]
                result["decisions"] = ",".join(s.method[:4] for s in report.sites)
                result["grad_error"] = report.grad_error
            print(f"  n={n:6d} {name:18s} {result[name]:8.3f} s/step", flush=True)
        rows.append(result)

    lines = [header, "", "| n | eager (s) | Inductor exact (s) | almostlinear auto (s) | speed-up vs Inductor | "
             "decisions | gradient error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = "-" if r.get("eager") is None else f"{r['eager']:.3f}"
        speed = r["inductor exact"] / r["almostlinear auto"]
        err = "-" if r.get("grad_error") is None else f"{r['grad_error']:.3g}"
        lines.append(f"| {r['n']} | {eager} | {r['inductor exact']:.3f} | {r['almostlinear auto']:.3f} | {speed:.2f}x | "
                     f"{r.get('decisions', '-')} | {err} |")
    table = "\n".join(lines)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r["n"] for r in rows]
        for name in ("eager", "inductor exact", "almostlinear auto"):
            points = [(r["n"], r[name]) for r in rows if r.get(name) is not None]
            if points:
                ax.loglog(*zip(*points), marker="o", label=name)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("context length n")
        ax.set_ylabel("seconds per training step")
        ax.legend()
        ax.set_title("GPT training step")
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {args.out.with_suffix('.md')} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
