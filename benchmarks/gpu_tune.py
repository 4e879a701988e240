"""Launch-configuration sweep of the Triton kernels on a CUDA GPU (about 3 minutes with compiles).

    python benchmarks/gpu_tune.py [--n 32768] [--d 64]

For each (BLOCK rows, num_warps, num_stages, SPLIT rows per non-causal partial state) it times poly_attention
forward + backward (bf16 inputs, B = H = 1, median of 10) causal and not, checks the result against the
current defaults (max relative difference), and prints the table sorted by the sum of both times.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch

from almostlinear.kernels import poly_attention
from almostlinear.kernels.triton import poly_attention as tr
# benchmarks/gpu_profile.py: Python puts the running script's own folder first on the import path
from gpu_profile import timed  # median wall time in ms, CUDA synchronised


def fwd_bwd(q, k, v, grad, causal):
    out = poly_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]), causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=64)
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; n={a.n} d={a.d}", flush=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, a.n, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 1, a.n, a.d, device="cuda", dtype=torch.bfloat16)
    reference = {c: [t.detach().float() for t in fwd_bwd(q, k, v, grad, c)] for c in (False, True)}
    default_cfg, default_block, default_split = tr._cfg, tr.BLOCK, tr.SPLIT
    rows = []
    for block, warps, stages, split in itertools.product((64, 128), (4, 8), (1, 2, 3), (1024, 4096)):
        tr.BLOCK, tr.SPLIT = block, split
        tr._cfg = lambda D, E, w=warps, s=stages: (min(E, 64), dict(num_warps=w, num_stages=s))
        try:
            times, worst = [], 0.0
            for causal in (False, True):
                got = fwd_bwd(q, k, v, grad, causal)
                worst = max(worst, *(float((g.detach().float() - r).abs().max() / r.abs().max())
                                     for g, r in zip(got, reference[causal])))
                times.append(timed(lambda c=causal: fwd_bwd(q, k, v, grad, c)))
            rows.append((sum(times), block, warps, stages, split, *times, worst))
            print(f"BLOCK={block:4d} warps={warps} stages={stages} SPLIT={split:5d}: non-causal {times[0]:7.2f} ms"
                  f"  causal {times[1]:7.2f} ms  max rel. diff vs defaults {worst:.1e}", flush=True)
        except Exception as e:  # a configuration that does not compile or fit is reported and skipped
            print(f"BLOCK={block} warps={warps} stages={stages} SPLIT={split}: failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120]}", flush=True)
    tr._cfg, tr.BLOCK, tr.SPLIT = default_cfg, default_block, default_split
    print("\nbest first (sum of both):")
    for r in sorted(rows)[:8]:
        print("  BLOCK={1} warps={2} stages={3} SPLIT={4}: non-causal {5:.2f} ms, causal {6:.2f} ms, diff {7:.1e}"
              .format(*r))


if __name__ == "__main__":
    main()
