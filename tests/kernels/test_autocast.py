"""Low precision: the op with bf16/fp16 inputs, the op under CPU autocast, and a compiled site under autocast.

Under autocast the op stands in for matmul/softmax/SDPA, which autocast runs in its lower precision dtype: q, k, v
are cast to the autocast dtype, the output has that dtype (as eager attention's), fp32 inputs get fp32 grads, and
the kernels themselves still compute in fp32 (autocast used to recast their matmuls: "Expected out tensor to have
dtype BFloat16").
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import almostlinear
from almostlinear.kernels import cpu, naive_poly_attention, poly_attention

from tests.kernels.kernel_helpers import make_inputs, rms_ratio

OP = torch.ops.almostlinear.poly_attention.default
LOW = [torch.bfloat16, torch.float16]
# relative error bounds of a low precision result against an fp32 one (unit roundoff 2^-8 / 2^-11, a few roundings)
TOL = {torch.bfloat16: 0.03, torch.float16: 0.005}


def _cases():
    return [dict(causal=False), dict(causal=True), dict(kw=True), dict(alibi=True), dict(causal=True, window=5)]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", _cases(), ids=str)
def test_low_precision_inputs_give_output_and_grads_in_their_dtype(dtype, case):
    causal, window = case.get("causal", False), case.get("window", 0)
    q, k, v, kw, slopes = make_inputs(1, 4, 2, 40, D=8, Dv=8, kw=case.get("kw", False),
                                      alibi=case.get("alibi", False), std=0.5)
    lo = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.detach().to(dtype).float().requires_grad_() for t in (q, k, v)]  # same values, fp32
    kwargs = dict(scale=0.35, causal=causal, window=window, key_weight=kw, alibi_slopes=slopes)
    out = poly_attention(*lo, **kwargs)
    out_ref = poly_attention(*ref, **kwargs)
    assert out.dtype == dtype
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, lo, cot.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, ref, cot.to(dtype).float())
    assert rms_ratio(out, out_ref) < TOL[dtype]
    for g, g_ref, t in zip(grads, grads_ref, lo):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.isfinite(g).all()
        assert rms_ratio(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", _cases(), ids=str)
def test_op_under_autocast_casts_like_sdpa(dtype, case):
    """fp32 inputs in an autocast region: the result is the op on q, k, v cast to the autocast dtype (out in that
    dtype, like SDPA's), and the grads reach the fp32 inputs in fp32."""
    causal, window = case.get("causal", False), case.get("window", 0)
    q, k, v, kw, slopes = make_inputs(1, 4, 2, 40, D=8, Dv=8, kw=case.get("kw", False),
                                      alibi=case.get("alibi", False), std=0.5)
    kwargs = dict(scale=0.35, causal=causal, window=window, key_weight=kw, alibi_slopes=slopes)
    with torch.autocast("cpu", dtype=dtype):
        out = poly_attention(q, k, v, **kwargs)
        if not (kw is not None or slopes is not None or window):
            assert out.dtype == F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).dtype
    assert out.dtype == dtype
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.autocast("cpu", dtype=dtype):  # a backward inside the region (as a loss computed there)
        grads = torch.autograd.grad(out, (q, k, v), cot)
    lo = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out_lo = poly_attention(*lo, **kwargs)
    grads_lo = torch.autograd.grad(out_lo, lo, cot)
    torch.testing.assert_close(out, out_lo, atol=0, rtol=0)
    for g, g_lo, t in zip(grads, grads_lo, (q, k, v)):
        assert g.dtype == torch.float32 == t.dtype
        torch.testing.assert_close(g, g_lo.float(), atol=0, rtol=0)


def test_float64_is_not_autocast():
    q, k, v, _, _ = make_inputs(1, 2, 2, 20, D=4, Dv=4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = poly_attention(q, k, v, scale=0.5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    ref = naive_poly_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_ignore_an_enclosing_autocast(causal):
    """cpu.forward / cpu.backward called directly in an autocast region compute exactly as outside it."""
    q, k, v, _, _ = make_inputs(1, 2, 2, 300, D=8, Dv=8, requires_grad=False, std=0.5)
    args = dict(scale=0.35, coeffs=(1.0, 1.0, 0.5), causal=causal)
    out, den, state = cpu.forward(q, k, v, **args)
    grad = torch.randn_like(out)
    grads = cpu.backward(grad, q, k, v, out, **args, state=state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2, den2, state2 = cpu.forward(q, k, v, **args)
        grads2 = cpu.backward(grad, q, k, v, out, **args, state=state2)
    assert out2.dtype == torch.float32
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    for a, b in zip(grads2, grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- end to end: a compiled attention site under autocast, against eager under the same autocast


class _Attention(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        if self.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (q @ k.mT / 32 ** .5).softmax(-1) @ v


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CONFIGS = [(method, causal, dtype, 0) for method in ("polynomial", "auto") for causal in (False, True) for dtype in LOW]
CONFIGS += [("polynomial", causal, dtype, 1) for causal in (False, True) for dtype in LOW]


@pytest.mark.parametrize("method,causal,dtype,recheck_every", CONFIGS, ids=str)
def test_compiled_site_under_autocast_matches_eager(method, causal, dtype, recheck_every):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 64, 32, generator=g) * s for s in (0.3, 0.3, 1.0)]  # bounded logits (std ~0.1)
    q, k, v = [t.clone().requires_grad_() for t in base]
    qe, ke, ve = [t.clone().requires_grad_() for t in base]
    model = _Attention(causal)
    backend = almostlinear.Backend(min_seq_len=0, inner="eager", method=method, recheck_every=recheck_every)
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            out = compiled(q, k, v)
            ref = model(qe, ke, ve)
            cot = torch.randn(ref.shape, generator=g)
            (out.float() * cot).sum().backward()
            (ref.float() * cot).sum().backward()
    sites = [s for r in backend.reports for s in r.sites]
    assert sites and all(s.rewritten and s.method == "polynomial" for s in sites)
    assert out.dtype == ref.dtype == dtype
    assert _rel(out, ref) < 0.01
    for a, b in ((q, qe), (k, ke), (v, ve)):
        assert a.grad.dtype == b.grad.dtype == torch.float32
        assert torch.isfinite(a.grad).all()
        assert _rel(a.grad, b.grad) < 0.03
