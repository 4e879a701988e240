"""Where the Triton path's time goes on a CUDA GPU, and a compile check of the op (< 2 minutes).

    python benchmarks/gpu_profile.py [--n 8192] [--d 64]

1. torch.library.opcheck of the op on CUDA, and torch.compile(fullgraph=True, Inductor) of poly_attention,
   forward + backward, against the eager op (causal and not).
2. Per configuration (causal and not): wall time of forward, backward and both (bf16 inputs, B=H=1), then a
   torch.profiler table of the CUDA kernels and of the host-side ops of three fwd+bwd steps.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from almostlinear.kernels import poly_attention


def timed(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1000


def compile_check(d):
    """opcheck of the op on CUDA tensors, and Inductor (fullgraph, dynamic) against the eager op."""
    op = torch.ops.almostlinear.poly_attention.default
    for causal in (False, True):
        q, k, v = (torch.randn(1, 2, 256, d, device="cuda", requires_grad=True) for _ in range(3))
        kw = torch.ones(1, 256, device="cuda")
        torch.library.opcheck(op, (q, k, v, kw, None, 0.125, [1.0, 1.0, 0.5], causal, 0))
        q, k, v = (torch.randn(1, 2, 1024, d, device="cuda", requires_grad=True) for _ in range(3))
        fn = lambda q, k, v: poly_attention(q, k, v, scale=1 / math.sqrt(d), causal=causal)  # noqa: E731
        compiled = torch.compile(fn, fullgraph=True, dynamic=True)
        g = torch.randn(1, 2, 1024, d, device="cuda")
        ref = torch.autograd.grad(fn(q, k, v), (q, k, v), g)
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v), g)
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
        print(f"causal={causal}: opcheck OK; Inductor (fullgraph, dynamic) max rel. grad diff vs eager op "
              f"{worst:.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=64)
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    compile_check(a.d)
    from torch.profiler import ProfilerActivity, profile
    for causal in (False, True):
        q, k, v = (torch.randn(1, 1, a.n, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(1, 1, a.n, a.d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            return poly_attention(q, k, v, scale=1 / math.sqrt(a.d), causal=causal)

        def step():
            torch.autograd.grad(fwd(), (q, k, v), grad)

        out = fwd()

        def bwd():
            torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        with torch.no_grad():
            t_fwd = timed(fwd)
        t_bwd, t_step = timed(bwd), timed(step)
        print(f"\n== causal={causal} n={a.n} d={a.d}: fwd {t_fwd:.2f} ms, bwd {t_bwd:.2f} ms, fwd+bwd {t_step:.2f} ms",
              flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
