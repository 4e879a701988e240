"""Triton kernels on CPU tensors under TRITON_INTERPRET=1 (in a subprocess: the variable must be set before
triton is imported) against the naive reference, forward and backward, causal and not, GQA, key padding."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
from almostlinear.kernels.triton import poly_attention as tr
from almostlinear.kernels import naive_poly_attention
from tests.kernels.kernel_helpers import make_inputs, rms_ratio
tr.CHUNK = 32
tr.SPLIT = 16  # several partial states in the non-causal sums
worst = 0.0
for causal, kw, (Hq, Hk, L, S) in [(False, False, (2, 1, 40, 40)), (False, True, (2, 2, 20, 45)),
                                   (True, False, (2, 1, 70, 70)), (True, True, (1, 1, 40, 40))]:
    q, k, v, key_weight, _ = make_inputs(2, Hq, Hk, L, S, D=16, Dv=16, dtype=torch.float64, kw=kw)
    ref = naive_poly_attention(q, k, v, scale=0.25, causal=causal, key_weight=key_weight)
    g = torch.randn_like(ref)
    rg = torch.autograd.grad(ref, (q, k, v), g)
    f = lambda t: t.detach().float().contiguous()
    out, st = tr.forward(f(q), f(k), f(v), key_weight, scale=0.25, coeffs=(1.0, 1.0, 0.5), causal=causal)
    assert (st is None) == causal and (causal or st.numel() == tr.state_size(2, Hk, 16, 16))
    gr = tr.backward(f(g), f(q), f(k), f(v), out, key_weight, scale=0.25, coeffs=(1.0, 1.0, 0.5), causal=causal,
                     saved_state=st)
    rebuilt = tr.backward(f(g), f(q), f(k), f(v), out, key_weight, scale=0.25, coeffs=(1.0, 1.0, 0.5),
                          causal=causal)
    assert all(torch.equal(a, b) for a, b in zip(gr, rebuilt))  # the kept state is the one it would rebuild
    errs = [rms_ratio(out, ref)] + [rms_ratio(a, b) for a, b in zip(gr, rg)]
    print(causal, kw, Hq, Hk, L, S, errs, flush=True)
    worst = max(worst, *errs)
    if kw:
        assert (out[-1] == 0).all()
# value dim tiled in blocks (as for Dv = 128 on a GPU): force BLOCK_E = 16 with Dv = 32
tr._cfg = lambda D, E: (16, dict(num_warps=4, num_stages=1))
for causal in (False, True):
    q, k, v, _, _ = make_inputs(1, 2, 1, 40, D=16, Dv=32, dtype=torch.float64)
    ref = naive_poly_attention(q, k, v, scale=0.25, causal=causal)
    g = torch.randn_like(ref)
    rg = torch.autograd.grad(ref, (q, k, v), g)
    f = lambda t: t.detach().float().contiguous()
    out, st = tr.forward(f(q), f(k), f(v), None, scale=0.25, coeffs=(1.0, 1.0, 0.5), causal=causal)
    gr = tr.backward(f(g), f(q), f(k), f(v), out, None, scale=0.25, coeffs=(1.0, 1.0, 0.5), causal=causal,
                     saved_state=st)
    worst = max(worst, rms_ratio(out, ref), *[rms_ratio(a, b) for a, b in zip(gr, rg)])
assert worst < 1e-5, worst
print("OK")
'''


def test_triton_kernels_interpreted_vs_naive():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the child imports the helpers as the module tests.kernels.kernel_helpers of the repository root
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
