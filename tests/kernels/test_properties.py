"""Property tests: polynomial attention vs exact softmax attention.

If |P(s) / exp(s) - 1| <= eps on every observed logit s (valid pairs), each normalised row of weights
moves by at most 2 eps / (1 - eps) in l1, so |out - exact| <= 2 eps / (1 - eps) * max|V| entrywise.
"""
import math

import torch
from hypothesis import given, settings, strategies as st

from almostlinear.kernels import cpu, naive_exact_attention, poly_attention, taylor_coefficients
from almostlinear.kernels.features import evaluate_polynomial

from tests.kernels.kernel_helpers import make_inputs

KINDS = ["none", "causal", "key_padding", "causal+key_padding", "alibi", "window", "causal+window"]


def _args(kind, key_weight, slopes, L):
    return dict(causal=kind.startswith("causal"), key_weight=key_weight if "padding" in kind else None,
                alibi_slopes=slopes if kind == "alibi" else None, window=max(1, L // 3) if "window" in kind else 0)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2),
       L=st.integers(1, 20), D=st.sampled_from([2, 4, 8]), std=st.floats(0.05, 1.5), degree=st.sampled_from([2, 4]),
       seed=st.integers(0, 2**16), chunk=st.sampled_from([4, 7, 128]))
def test_error_bound_vs_exact(kind, B, Hk, G, L, D, std, degree, seed, chunk):
    if degree == 4 and D > 4:
        D = 4
    q, k, v, kw, slopes = make_inputs(B, Hk * G, Hk, L, D=D, Dv=3, dtype=torch.float64, seed=seed, kw=True,
                                      alibi=True, requires_grad=False, std=std)
    scale = 1 / math.sqrt(D)
    a = _args(kind, kw, slopes, L)
    coeffs = taylor_coefficients(degree)
    out, _, _ = cpu.forward(q, k, v, a["key_weight"], a["alibi_slopes"], scale=scale, coeffs=coeffs,
                            causal=a["causal"], window=a["window"], chunk=chunk)
    ref = naive_exact_attention(q, k, v, scale=scale, **a)
    s = scale * q @ k.repeat_interleave(G, 1).transpose(-1, -2)
    eps = (evaluate_polynomial(s, coeffs) * torch.exp(-s) - 1).abs().max().item()  # over all pairs (superset of valid)
    if eps < 1:
        bound = 2 * eps / (1 - eps) * v.abs().max().item()
        assert (out - ref).abs().max().item() <= bound * (1 + 1e-9) + 1e-12


def test_error_shrinks_with_logits():
    errs = []
    for std in (1.0, 0.5, 0.25, 0.125):
        q, k, v, _, _ = make_inputs(1, 2, 2, 64, D=16, Dv=8, dtype=torch.float64, requires_grad=False, std=std,
                                    seed=3)
        out = poly_attention(q, k, v, scale=0.25, causal=True)
        ref = naive_exact_attention(q, k, v, scale=0.25, causal=True)
        errs.append((out - ref).abs().max().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3
