"""Fast torch path (kernels/cpu/ and the op on CPU) against the naive reference: forward and grads."""
import pytest
import torch

from almostlinear.kernels import cpu, naive_poly_attention, poly_attention

from tests.kernels.kernel_helpers import make_inputs, rms_ratio

MASKS = {  # kind -> (causal, key_padding, alibi, window)
    "none": (False, False, False, 0),
    "causal": (True, False, False, 0),
    "key_padding": (False, True, False, 0),
    "causal+key_padding": (True, True, False, 0),
    "alibi": (False, False, True, 0),
    "causal+alibi": (True, True, True, 0),
    "window": (False, False, False, 7),
    "causal+window": (True, False, False, 7),
    "causal+window+alibi+padding": (True, True, True, 11),
    "window+alibi": (False, False, True, 5),
}


def _check(kind, *, B=2, Hq=4, Hk=2, L=37, S=None, D=8, Dv=6, chunk=8, dtype=torch.float64, tol=1e-10,
           coeffs=(1.0, 1.0, 0.5), scale=0.3):
    causal, kw, alibi, window = MASKS[kind]
    q, k, v, key_weight, slopes = make_inputs(B, Hq, Hk, L, S, D, Dv, dtype=dtype, kw=kw, alibi=alibi)
    ref = naive_poly_attention(q, k, v, scale=scale, degree=len(coeffs) - 1, coefficients=coeffs, causal=causal,
                               key_weight=key_weight, alibi_slopes=slopes, window=window)
    grad = torch.randn_like(ref)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    with torch.no_grad():
        out, den, state = cpu.forward(q, k, v, key_weight, slopes, scale=scale, coeffs=coeffs, causal=causal,
                                      window=window, chunk=chunk)
        dq, dk, dv = cpu.backward(grad, q, k, v, out, key_weight, slopes, scale=scale, coeffs=coeffs,
                                  causal=causal, window=window, chunk=chunk, state=state)
        rebuilt = cpu.backward(grad, q, k, v, out, key_weight, slopes, scale=scale, coeffs=coeffs,
                               causal=causal, window=window, chunk=chunk)
    assert (state is None) == (causal or window > 0)  # only the global (non-causal) state is kept
    assert torch.isfinite(out).all()
    for name, a, b in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert rms_ratio(a, b) < tol, (name, rms_ratio(a, b))
    for a, b in zip((dq, dk, dv), rebuilt):  # the kept state is the one the backward would rebuild
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    if kw and B > 1:
        assert (out[-1] == 0).all()  # every key masked -> 0


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("chunk", [8, 5])
def test_masks_fp64(kind, chunk):
    _check(kind, chunk=chunk)


@pytest.mark.parametrize("kind", ["none", "causal", "alibi", "causal+window"])
def test_gqa_mha_and_mqa(kind):
    _check(kind, Hq=3, Hk=3)
    _check(kind, Hq=4, Hk=1, L=19)


@pytest.mark.parametrize("kind", ["none", "key_padding", "alibi"])
def test_cross_lengths(kind):
    _check(kind, L=13, S=29)
    _check(kind, L=29, S=6)


def test_blocked_features_d64_and_negative_coefficients():
    _check("causal", D=64, Dv=16, L=21, B=1, Hq=2, Hk=1, scale=0.125)
    _check("none", D=20, Dv=5, coeffs=(1.0, -1.0, 1.0))


@pytest.mark.parametrize("kind", ["none", "causal+key_padding", "alibi", "causal+alibi"])
def test_degree4(kind):
    # degree 4 keeps the denominator's moments in feature space (moments.FeatureMoments), per query-head group
    # under ALiBi
    _check(kind, D=4, L=23, coeffs=(1.0, 1.0, 0.5, 1 / 6, 1 / 24))


@pytest.mark.parametrize("kind", ["none", "causal", "causal+key_padding", "alibi", "causal+window"])
def test_fp32_default_chunk(kind):
    # L > cpu.CHUNK and not a multiple of it: the op's own chunking
    causal, kw, alibi, window = MASKS[kind]
    L = cpu.CHUNK * 2 + 19
    q, k, v, key_weight, slopes = make_inputs(1, 2, 1, L, D=16, Dv=8, kw=kw, alibi=alibi, dtype=torch.float32)
    out = poly_attention(q, k, v, scale=0.25, causal=causal, key_weight=key_weight, alibi_slopes=slopes,
                         window=window * 9)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(qd, kd, vd, scale=0.25, causal=causal, key_weight=key_weight, alibi_slopes=slopes,
                               window=window * 9)
    grad = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), grad)
    r = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    assert rms_ratio(out, ref) < 1e-5
    for a, b in zip(g, r):
        assert rms_ratio(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal+key_padding", "alibi"])
def test_half_types(dtype, kind):
    causal, kw, alibi, window = MASKS[kind]
    q, k, v, key_weight, slopes = make_inputs(2, 2, 1, 45, D=16, Dv=8, kw=kw, alibi=alibi, dtype=dtype)
    out = poly_attention(q, k, v, scale=0.25, causal=causal, key_weight=key_weight, alibi_slopes=slopes)
    assert out.dtype == dtype
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(qd, kd, vd, scale=0.25, causal=causal, key_weight=key_weight, alibi_slopes=slopes)
    grad = torch.randn(out.shape, dtype=torch.float64)
    g = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    r = torch.autograd.grad(ref, (qd, kd, vd), grad)
    assert rms_ratio(out, ref) < 5e-3
    for a, b in zip(g, r):
        assert a.dtype == dtype
        assert rms_ratio(a, b) < 1e-2


@pytest.mark.parametrize("kind", ["none", "causal+key_padding", "causal+alibi", "window+alibi"])
def test_gradcheck(kind):
    causal, kw, alibi, window = MASKS[kind]
    q, k, v, key_weight, slopes = make_inputs(1, 2, 1, 6, D=3, Dv=2, kw=kw, alibi=alibi, dtype=torch.float64)
    if key_weight is not None:
        key_weight = key_weight.double()

    def f(q, k, v):
        return poly_attention(q, k, v, scale=0.5, causal=causal, key_weight=key_weight, alibi_slopes=slopes,
                              window=window // 3)

    assert torch.autograd.gradcheck(f, (q, k, v))
