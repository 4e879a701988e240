"""GPU check of the Triton kernels (< 4 minutes on one H100/H200, triton compile included).

    python benchmarks/gpu_check.py [--budget-s 200] [--max-n 65536]

1. correctness at n=4096 (d=64, 128; causal / not; key padding; GQA): poly_attention on CUDA (Triton path)
   against naive_poly_attention (fp32, materialised), forward and q/k/v grads, rms(a-b)/rms(b);
   plus the torch fallback on CUDA (ALiBi, window) at n=2048.
2. fwd+bwd time of poly_attention (bf16 in, fp32 features) vs F.scaled_dot_product_attention (bf16, flash)
   for n = 4k .. 64k, d = 64 and 128, causal and not, B=H=1.  Every row is guarded: a failure is printed and
   the script goes on; rows stop when --budget-s is spent.
"""
from __future__ import annotations

import argparse
import math
import time
import traceback

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def check(torch, poly_attention, naive_poly_attention, *, n, d, causal, kw, gqa, alibi=False, window=0):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    Hq, Hk = (4, 2) if gqa else (2, 2)
    q = torch.randn(1, Hq, n, d, device=dev, generator=g) * 0.5
    k = torch.randn(1, Hk, n, d, device=dev, generator=g) * 0.5
    v = torch.randn(1, Hk, n, d, device=dev, generator=g)
    key_weight = (torch.rand(1, n, device=dev, generator=g) > 0.2).float() if kw else None
    slopes = torch.linspace(0.01, 0.2, Hq, device=dev) if alibi else None
    args = dict(scale=1 / math.sqrt(d), causal=causal, key_weight=key_weight, alibi_slopes=slopes, window=window)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = poly_attention(qs, ks, vs, **args)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qs, ks, vs), go)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(qr, kr, vr, **args)
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), go)
    errs = [rms(out, ref)] + [rms(a, b) for a, b in zip(grads, rgrads)]
    ok = all(math.isfinite(e) and e < 2e-3 for e in errs)
    return ok, errs


def run_check(torch, label, run):
    """One correctness case: run() -> (ok, errors); logs OK / FAIL / ERROR (the case raised: keep going) under
    ``label`` and returns the number of failures (0 or 1)."""
    try:
        ok, errs = run()
        log(f"{'OK  ' if ok else 'FAIL'} {label} errs={['%.2e' % e for e in errs]}")
        return int(not ok)
    except Exception as e:  # keep going
        log(f"ERROR {label}: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    finally:
        torch.cuda.empty_cache()


def bench(torch, fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop timing rows after this many seconds")
    ap.add_argument("--max-n", type=int, default=65536)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import triton
    from almostlinear.kernels import naive_poly_attention, poly_attention
    from almostlinear.kernels.triton import poly_attention as tr
    log(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"dot precision {tr._PREC}; chunk {tr.CHUNK}")
    log("== correctness vs naive (rms(a-b)/rms(b): out, dq, dk, dv) ==")
    cases = [dict(n=4096, d=64, causal=False, kw=False, gqa=False),
             dict(n=4096, d=64, causal=True, kw=False, gqa=False),
             dict(n=4096, d=64, causal=True, kw=True, gqa=True), dict(n=4096, d=128, causal=False, kw=True, gqa=True),
             dict(n=4096, d=128, causal=True, kw=False, gqa=False),
             dict(n=2048, d=64, causal=True, kw=False, gqa=False, alibi=True),
             dict(n=2048, d=64, causal=True, kw=True, gqa=False, window=256)]
    n_fail = 0
    prec0 = tr._PREC
    cases.append(dict(n=4096, d=64, causal=True, kw=True, gqa=True, prec="tf32x3" if prec0 == "tf32" else "tf32"))
    for c in cases:
        tr._PREC = c.pop("prec", prec0)
        n_fail += run_check(torch, f"{c} precision={tr._PREC}",
                            lambda: check(torch, poly_attention, naive_poly_attention, **c))
    tr._PREC = prec0
    log("== fwd+bwd time, B=H=1, bf16 inputs; SDPA = flash ==")
    alt = "tf32x3" if tr._PREC == "tf32" else "tf32"
    log(f"{'d':>4} {'causal':>6} {'n':>6} {'poly (ms)':>10} {'poly ' + alt:>12} {'sdpa (ms)':>10} {'speed-up':>8} "
        f"{'poly peak GB':>12}   (poly: dot precision {tr._PREC}; speed-up = sdpa / poly)")
    for d in (64, 128):
        for causal in (False, True):
            for n in (4096, 8192, 16384, 32768, 65536):
                if n > a.max_n:
                    continue
                if time.time() - T0 > a.budget_s:
                    log(f"budget spent, skipping d={d} causal={causal} n={n}")
                    continue
                row = [f"{d:>4}", f"{causal!s:>6}", f"{n:>6}"]
                try:
                    q, k, v = (torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    go = torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16)

                    def run_poly():
                        o = poly_attention(q, k, v, scale=d ** -0.5, causal=causal)
                        torch.autograd.grad(o, (q, k, v), go)

                    def run_sdpa():
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        torch.autograd.grad(o, (q, k, v), go)

                    torch.cuda.reset_peak_memory_stats()
                    tp = bench(torch, run_poly)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 30
                    prec, tr._PREC = tr._PREC, alt
                    try:
                        tp32 = bench(torch, run_poly)
                    finally:
                        tr._PREC = prec
                    ts = bench(torch, run_sdpa)
                    row += [f"{tp * 1e3:10.2f}", f"{tp32 * 1e3:12.2f}", f"{ts * 1e3:10.2f}", f"{ts / tp:8.2f}",
                            f"{peak:12.2f}"]
                except Exception as e:
                    row.append(f"ERROR {type(e).__name__}: {str(e)[:200]}")
                log(" ".join(row))
                torch.cuda.empty_cache()
    log(f"done; correctness failures: {n_fail}")


if __name__ == "__main__":
    main()
