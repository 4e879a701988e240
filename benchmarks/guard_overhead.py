"""What the run-time logit guard costs (option `guard`, rewriter/guard.py): fwd+bwd of one causal attention site
compiled with `Backend(method="auto", min_seq_len=0, inner="aot_eager")`, guard on and off, timed interleaved in
one process (the VM's speed drifts), minimum and median of `--repeats` rounds.

    python benchmarks/guard_overhead.py                  # n = 16k and 32k, d = 64, B = H = 1; about 1 minute

With the guard every approximated site runs the switchable op (per-head mode), whose backward recomputes the causal
states the plain op keeps, and two row-norm reductions per call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import almostlinear


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def compiled(guard: bool, inputs) -> tuple:
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="auto", min_seq_len=0, inner="aot_eager", guard=guard)
    fn = torch.compile(Causal(), backend=backend)
    step(fn, inputs)  # compiles and plans
    return fn, backend.reports[-1].sites[0].method


def step(fn, inputs) -> float:
    args = [t.clone().requires_grad_() for t in inputs]
    started = time.perf_counter()
    fn(*args).sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| n | guard off: min (median) s | guard on: min (median) s | on / off (min) | site |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        inputs = [0.1 * torch.randn(1, 1, n, args.d, generator=g) for _ in range(3)]
        fns = {guard: compiled(guard, inputs) for guard in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for guard in (False, True):
                times[guard].append(step(fns[guard][0], inputs))
        off, on = times[False], times[True]
        print(f"| {n} | {min(off):.3f} ({statistics.median(off):.3f}) | {min(on):.3f} ({statistics.median(on):.3f}) "
              f"| {min(on) / min(off):.2f} | {fns[True][1]} |")


if __name__ == "__main__":
    main()
