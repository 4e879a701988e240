"""The run-time switchable site: both modes match their references, forward and backward agree."""
import pytest
import torch

from almostlinear.kernels import naive_exact_attention, naive_poly_attention
from almostlinear.kernels.switchable import switchable_attention

COEFFS = [1.0, 1.0, 0.5]


def _inputs(seed=0, hq=4, hk=2, L=40):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, L, 8, generator=g).requires_grad_()
    k = torch.randn(2, hk, L, 8, generator=g).requires_grad_()
    v = torch.randn(2, hk, L, 8, generator=g).requires_grad_()
    kw = torch.ones(2, L)
    kw[1, 30:] = 0
    return q, k, v, kw


@pytest.mark.parametrize("padding", [True, False])  # without padding the exact backward is the fused CPU kernel
@pytest.mark.parametrize("mode", [1, 0])
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (True, 7)])
def test_each_mode_matches_its_naive_reference(mode, causal, window, padding):
    q, k, v, kw = _inputs()
    kw = kw if padding else None
    switch = torch.tensor(mode, dtype=torch.int8)
    out, used, _ = switchable_attention(q, k, v, kw, None, switch, 0.3, COEFFS, causal, window)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, (q, k, v), cot)
    reference = naive_poly_attention if mode else naive_exact_attention
    kwargs = {"coefficients": COEFFS} if mode else {}
    ref = reference(q, k, v, scale=0.3, causal=causal, key_weight=kw, window=window, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cot)
    assert int(used) == mode
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_uses_the_mode_of_its_forward_even_if_the_switch_flips():
    q, k, v, kw = _inputs()
    switch = torch.tensor(1, dtype=torch.int8)
    out, _, _ = switchable_attention(q, k, v, None, None, switch, 0.3, COEFFS, True, 0)
    switch.fill_(0)  # flipped between forward and backward
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = naive_poly_attention(q, k, v, scale=0.3, causal=True, coefficients=COEFFS)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck():
    q, k, v, kw = _inputs(L=16)
    switch = torch.tensor(1, dtype=torch.int8)
    torch.library.opcheck(torch.ops.almostlinear.switchable_attention.default,
                          (q, k, v, kw, None, switch, 0.3, COEFFS, True, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [1, 0])
@pytest.mark.parametrize("causal,padding", [(False, False), (True, False), (True, True)])
def test_low_precision_and_autocast(dtype, mode, causal, padding):
    """Low precision inputs: out and grads in their dtypes, close to fp32.  fp32 inputs under autocast: the op
    casts q, k, v to the autocast dtype (as SDPA would) in either mode, fp32 grads, equal to the cast inputs' result;
    the backward may run inside the autocast region."""
    q, k, v, kw = _inputs()
    q, k = q.detach() * 0.4, k.detach() * 0.4
    kw = kw if padding else None
    switch = torch.tensor(mode, dtype=torch.int8)
    cot = torch.randn(2, 4, 40, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    lo = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.detach().float().requires_grad_() for t in lo]
    out_lo, _, _ = switchable_attention(*lo, kw, None, switch, 0.3, COEFFS, causal, 0)
    out_ref, _, _ = switchable_attention(*ref, kw, None, switch, 0.3, COEFFS, causal, 0)
    grads_lo = torch.autograd.grad(out_lo, lo, cot)
    grads_ref = torch.autograd.grad(out_ref, ref, cot.float())
    tol = 0.03 if dtype == torch.bfloat16 else 0.005
    assert out_lo.dtype == dtype
    assert ((out_lo.float() - out_ref).norm() / out_ref.norm()) < tol
    for g, g_ref in zip(grads_lo, grads_ref):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert ((g.float() - g_ref).norm() / g_ref.norm()) < tol

    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=dtype):
        out, used, _ = switchable_attention(*x, kw, None, switch, 0.3, COEFFS, causal, 0)
        grads = torch.autograd.grad(out, x, cot)
    assert int(used) == mode and out.dtype == dtype
    torch.testing.assert_close(out, switchable_attention(*[t.detach().to(dtype) for t in x], kw, None, switch, 0.3,
                                                         COEFFS, causal, 0)[0], atol=0, rtol=0)
    for g, g_lo in zip(grads, grads_lo):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_lo.float(), atol=0, rtol=0)


def _per_head_reference(q, k, v, kw, alibi, modes, causal, window):
    """Each key/value head (and its query heads) through its mode's naive reference, then put back together."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for h, on in enumerate(modes):
        qh = q[:, h * groups:(h + 1) * groups]
        slopes = alibi[h * groups:(h + 1) * groups] if alibi is not None else None
        kwargs = {"coefficients": COEFFS} if on else {}
        reference = naive_poly_attention if on else naive_exact_attention
        outs.append(reference(qh, k[:, h:h + 1], v[:, h:h + 1], scale=0.3, causal=causal, key_weight=kw,
                              alibi_slopes=slopes, window=window, **kwargs))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("modes", [(1, 0), (0, 1), (1, 0, 0, 1)])
@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("causal,window,alibi", [(False, 0, False), (True, 0, False), (True, 7, False),
                                                 (True, 0, True)])
def test_per_head_modes_match_each_heads_reference(modes, padding, causal, window, alibi):
    """A [Hk] switch: the op on the heads whose mode is 1, exact attention on the others (GQA: 2 query heads per
    key/value head); outputs and all three gradients equal the per-head naive references."""
    q, k, v, kw = _inputs(hq=2 * len(modes), hk=len(modes))
    kw = kw if padding else None
    slopes = torch.linspace(-0.3, -0.05, q.shape[1]) if alibi else None
    switch = torch.tensor(modes, dtype=torch.int8)
    out, used, _ = switchable_attention(q, k, v, kw, slopes, switch, 0.3, COEFFS, causal, window)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, (q, k, v), cot)
    ref = _per_head_reference(q, k, v, kw, slopes, modes, causal, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cot)
    assert used.tolist() == list(modes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_per_head_switch_passes_opcheck():
    q, k, v, kw = _inputs()
    torch.library.opcheck(torch.ops.almostlinear.switchable_attention.default,
                          (q, k, v, kw, None, torch.tensor([1, 0], dtype=torch.int8), 0.3, COEFFS, True, 0))
