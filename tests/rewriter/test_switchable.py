"""The run-time switchable site: both modes match their references, forward and backward agree."""
import pytest
import torch

from almostlinear.kernels import naive_exact_attention, naive_poly_attention
from almostlinear.rewriter.switchable import switchable_attention

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
    out, used = switchable_attention(q, k, v, kw, None, switch, 0.3, COEFFS, causal, window)
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
    out, _ = switchable_attention(q, k, v, None, None, switch, 0.3, COEFFS, True, 0)
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
