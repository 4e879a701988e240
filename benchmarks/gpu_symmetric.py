"""Issue 13's device check: the block-symmetric Triton kernels (kernels/triton/symmetric.py) on one CUDA GPU.

    python benchmarks/gpu_symmetric.py [--budget-s 420] [--max-n 131072] [--heads 8]

Prepared without a GPU (the kernels pass their tests under TRITON_INTERPRET=1); one run on a lent device gives:
1. correctness against naive_poly_attention (fp64 reference on upcast inputs, n = 1024 / 2048): outputs and the
   three gradients, rms(a - b) / rms(b), for bf16 and fp32 inputs, d = 64 and 128, causal or not, key padding,
   GQA; every output checked finite;
2. fwd+bwd time, B = 1, H = --heads, bf16: the symmetric kernels, the current op (poly_attention: the old
   Triton path), flash SDPA; medians of triton.testing.do_bench; peak memory of each; rows stop when the
   budget is spent (each row guarded: an error is printed and the script goes on).
Prints the table last; with $OUT set, also writes $OUT/gpu_symmetric.md.
"""
from __future__ import annotations

import argparse
import math
import os
import time

from gpu_check import T0, log, rms, run_check  # benchmarks/ is this script's directory: the same log clock and error measure


def inputs(torch, B, Hq, Hk, n, d, dtype, kw, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, Hq, n, d, device="cuda", generator=g) * 0.5).to(dtype)
    k = (torch.randn(B, Hk, n, d, device="cuda", generator=g) * 0.5).to(dtype)
    v = torch.randn(B, Hk, n, d, device="cuda", generator=g).to(dtype)
    key_weight = (torch.rand(B, n, device="cuda", generator=g) > 0.2).float() if kw else None
    return q, k, v, key_weight


def check(torch, sym, naive, *, n, d, causal, kw, gqa, dtype):
    Hq, Hk = (4, 2) if gqa else (2, 2)
    q, k, v, key_weight = inputs(torch, 1, Hq, Hk, n, d, dtype, kw, seed=n + d)
    scale, coeffs = 1 / math.sqrt(d), (1.0, 1.0, 0.5)
    out, state = sym.forward(q, k, v, key_weight, scale=scale, coeffs=coeffs, causal=causal)
    go = torch.randn_like(out)
    grads = sym.backward(go, q, k, v, out, key_weight, scale=scale, coeffs=coeffs, causal=causal, saved_state=state)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive(*ref_in, scale=scale, causal=causal, key_weight=key_weight)
    rgrads = torch.autograd.grad(ref, ref_in, go.double())
    errs = [rms(out, ref)] + [rms(a, b) for a, b in zip(grads, rgrads)]
    finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
    bound = 2e-2 if dtype == torch.bfloat16 else 2e-3
    return finite and all(e < bound for e in errs), errs


def fwd_bwd(sym, q, k, v, go, causal):
    scale, coeffs = q.shape[-1] ** -0.5, (1.0, 1.0, 0.5)
    out, state = sym.forward(q, k, v, None, scale=scale, coeffs=coeffs, causal=causal)
    return sym.backward(go, q, k, v, out, None, scale=scale, coeffs=coeffs, causal=causal, saved_state=state)


def timed(torch, do_bench, fn):
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() / 2 ** 30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--max-n", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=8)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench
    from almostlinear.kernels import naive_poly_attention, poly_attention
    from almostlinear.kernels.triton import symmetric as sym
    log(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    log("== correctness vs naive fp64 (rms(a-b)/rms(b): out, dq, dk, dv) ==")
    n_fail = 0
    for dtype in (torch.bfloat16, torch.float32):
        for c in (dict(n=2048, d=64, causal=False, kw=False, gqa=False), dict(n=2048, d=64, causal=True, kw=True, gqa=True),
                  dict(n=1024, d=128, causal=True, kw=False, gqa=False), dict(n=1024, d=128, causal=False, kw=True, gqa=True),
                  dict(n=1000, d=64, causal=True, kw=False, gqa=False)):
            n_fail += run_check(torch, f"{dtype} {c}",
                                lambda: check(torch, sym, naive_poly_attention, dtype=dtype, **c))
    rows = [f"| d | causal | n | symmetric (ms) | current op (ms) | flash SDPA (ms) | symmetric vs flash | "
            f"symmetric peak GB | current peak GB |", "|---|---|---|---|---|---|---|---|---|"]
    H = a.heads
    for d in (64, 128):
        for causal in (True, False):
            for n in (4096, 8192, 16384, 32768, 65536, 131072):
                if n > a.max_n or time.time() - T0 > a.budget_s:
                    continue
                cells = [str(d), str(causal), str(n)]
                try:
                    q, k, v = (torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    go = torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16)
                    t_sym, m_sym = timed(torch, do_bench, lambda: fwd_bwd(sym, q.detach(), k.detach(), v.detach(), go,
                                                                            causal))
                    t_old, m_old = (timed(torch, do_bench, lambda: torch.autograd.grad(
                        poly_attention(q, k, v, scale=d ** -0.5, causal=causal), (q, k, v), go))
                        if n <= 32768 else (float("nan"), float("nan")))
                    t_sdpa, _ = timed(torch, do_bench, lambda: torch.autograd.grad(
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), go))
                    cells += [f"{t_sym:.2f}", f"{t_old:.2f}", f"{t_sdpa:.2f}", f"{t_sdpa / t_sym:.2f}x",
                              f"{m_sym:.2f}", f"{m_old:.2f}"]
                except Exception as e:
                    cells.append(f"ERROR {type(e).__name__}: {str(e)[:160]}")
                rows.append("| " + " | ".join(cells) + " |")
                log(rows[-1])
                torch.cuda.empty_cache()
    log(f"done; correctness failures: {n_fail}")
    table = "\n".join(rows)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_symmetric.md"), "w") as f:
            f.write(f"# gpu_symmetric.py, B=1, H={H}, bf16, fwd+bwd\n\n{table}\n")


if __name__ == "__main__":
    main()
