"""Polynomial attention with an exact window (kernels/exact_window.py) against the naive reference: every regime,
outputs and all three gradients in fp64; opcheck; stability at large logits; argument errors."""
import pytest
import torch

from almostlinear.kernels import exact_attention, naive_exact_attention, poly_attention
from almostlinear.kernels.exact_window import poly_window_attention
from almostlinear.kernels.naive import naive_window_attention

from tests.kernels.kernel_helpers import make_inputs

OP = torch.ops.almostlinear.poly_window_attention.default

REGIMES = [
    dict(causal=True, W=1), dict(causal=True, W=5), dict(causal=True, W=64), dict(causal=True, W=500),
    dict(causal=False, W=1), dict(causal=False, W=5), dict(causal=False, W=64), dict(causal=False, W=500),
    dict(causal=True, W=7, kw=True), dict(causal=False, W=7, kw=True),
    dict(causal=True, W=7, alibi=True), dict(causal=False, W=7, alibi=True),
    dict(causal=True, W=6, kw=True, alibi=True, window=20), dict(causal=False, W=6, kw=True, window=20),
    dict(causal=True, W=30, window=20),  # the exact window wider than the mask's window: exact attention
]


def _grads(fn, q, k, v, g, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


@pytest.mark.parametrize("r", REGIMES, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()))
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_the_naive_reference_outputs_and_gradients(r, gqa):
    q, k, v, key_weight, slopes = make_inputs(2, 4, 2 if gqa else 4, 150, D=8, Dv=6, dtype=torch.float64,
                                              kw=r.get("kw", False), alibi=r.get("alibi", False))
    args = dict(scale=0.4, exact_window=r["W"], causal=r["causal"], key_weight=key_weight, alibi_slopes=slopes,
                window=r.get("window", 0))
    g = torch.randn(2, 4, 150, 6, dtype=torch.float64)
    got = _grads(poly_window_attention, q, k, v, g, **args)
    want = _grads(naive_window_attention, q, k, v, g, **args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_over_every_key_is_exact_attention(causal):
    q, k, v, key_weight, _ = make_inputs(1, 2, 2, 40, D=8, Dv=4, dtype=torch.float64, kw=True)
    got = poly_window_attention(q, k, v, scale=0.3, exact_window=40, causal=causal, key_weight=key_weight)
    want = naive_exact_attention(q, k, v, scale=0.3, causal=causal, key_weight=key_weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_exact_window_is_the_polynomial_op():
    q, k, v, _, _ = make_inputs(1, 2, 2, 30, D=8, Dv=4)
    torch.testing.assert_close(poly_window_attention(q, k, v, scale=0.3, exact_window=0, causal=True),
                               poly_attention(q, k, v, scale=0.3, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_stay_finite_and_accurate_in_fp32(causal):
    """Logits of several hundred: exp(s) would overflow fp32 unshifted; the window then holds the row's mass."""
    q, k, v, _, _ = make_inputs(1, 2, 2, 90, D=8, Dv=4, std=12.0, dtype=torch.float64)
    g = torch.randn(1, 2, 90, 4, dtype=torch.float64)
    want = _grads(naive_window_attention, q, k, v, g, scale=1.0, exact_window=16, causal=causal)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    got = _grads(poly_window_attention, q32, k32, v32, g.float(), scale=1.0, exact_window=16, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-3 * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_window_brings_the_op_closer_to_softmax():
    """The point of the window: on local attention (logits that peak at the nearest keys, as trained language
    models' sharp heads do), keeping the nearest keys exact brings the output much nearer softmax."""
    L, D = 256, 16
    pos = torch.arange(L, dtype=torch.float32).unsqueeze(-1)
    freq = 1.0 / 50.0 ** (torch.arange(D // 2, dtype=torch.float32) / (D // 2))
    rope = torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)  # s_ij = c sum_f cos(w_f (i - j))
    q = (2.0 * rope + 0.3 * torch.randn(2, 4, L, D)).requires_grad_()
    k = (2.0 * rope + 0.3 * torch.randn(2, 4, L, D)).requires_grad_()
    v = torch.randn(2, 4, L, 8)
    exact = exact_attention(q, k, v, scale=0.5, causal=True)
    poly = poly_attention(q, k, v, scale=0.5, causal=True)
    windowed = poly_window_attention(q, k, v, scale=0.5, exact_window=32, causal=True)
    assert (windowed - exact).norm() < 0.25 * (poly - exact).norm()


@pytest.mark.parametrize("args", [dict(causal=True), dict(causal=False, kw=True), dict(causal=True, alibi=True, gqa=True),
                                  dict(causal=True, keep=True), dict(causal=False, window=4)])
def test_opcheck(args):
    q, k, v, key_weight, slopes = make_inputs(2, 4 if args.get("gqa") else 2, 2, 11, D=4, Dv=3,
                                              kw=args.get("kw", False), alibi=args.get("alibi", False))
    torch.library.opcheck(OP, (q, k, v, key_weight, slopes, 0.4, [1.0, 1.0, 0.5], args["causal"],
                               args.get("window", 0), 3, args.get("keep", False)))


def test_compiles_without_graph_break():
    q, k, v, _, _ = make_inputs(1, 2, 2, 40, D=8, Dv=4)

    def f(q, k, v):
        return poly_window_attention(q, k, v, scale=0.3, exact_window=8, causal=True).sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, message", [
    (dict(exact_window=-1), "exact_window must be an int >= 0"),
    (dict(exact_window=2.5), "exact_window must be an int >= 0"),
    (dict(exact_window=4, cross=True), "equal query and key lengths"),
])
def test_bad_arguments_name_the_value(bad, message):
    q, k, v, _, _ = make_inputs(1, 2, 2, 10, 12 if bad.pop("cross", False) else None, D=4, Dv=4)
    with pytest.raises(ValueError, match=message):
        poly_window_attention(q, k, v, scale=0.5, **bad)


@pytest.mark.parametrize("causal", [False, True])
def test_the_kept_band_gives_the_recomputed_gradients(causal, monkeypatch):
    """With a backward to come the forward keeps the band's weights (within cpu.KEEP_STATES_MIB); the gradients
    are those of the backward that recomputes them (limit 0)."""
    from almostlinear.kernels import cpu
    q, k, v, key_weight, slopes = make_inputs(2, 4, 2, 70, D=8, Dv=6, kw=True, alibi=True)
    g = torch.randn(2, 4, 70, 6)
    args = dict(scale=0.4, exact_window=9, causal=causal, key_weight=key_weight, alibi_slopes=slopes)
    out = OP(q, k, v, key_weight, slopes, 0.4, [1.0, 1.0, 0.5], causal, 0, 9, True)
    assert out[3].numel() > 0  # kept
    kept = _grads(poly_window_attention, q, k, v, g, **args)
    monkeypatch.setattr(cpu, "KEEP_STATES_MIB", 0.0)
    assert OP(q, k, v, key_weight, slopes, 0.4, [1.0, 1.0, 0.5], causal, 0, 9, True)[3].numel() == 0
    recomputed = _grads(poly_window_attention, q, k, v, g, **args)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rows_whose_far_keys_are_all_padding_are_exact_in_fp32():
    """A left-padded row whose only far keys are padding has no polynomial part: it is left out, not subtracted
    (den_p - sum P(s) cancelled to round-off and moved its gradients by 9% of their size: found in review)."""
    L, W, pad = 32, 8, 16
    q = torch.tensor([3.0, 0, 0, 0]).expand(1, 1, L, 4).clone().requires_grad_()
    k = torch.tensor([-3.0, 0, 0, 0]).expand(1, 1, L, 4).clone().requires_grad_()  # s = -9: P(s) >> e^s
    v = torch.randn(1, 1, L, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    key_weight = torch.cat([torch.zeros(1, pad), torch.ones(1, L - pad)], 1)
    g = torch.randn(1, 1, L, 4, generator=torch.Generator().manual_seed(1))
    args = dict(scale=1.0, exact_window=W, causal=True, key_weight=key_weight)
    got = _grads(poly_window_attention, q, k, v, g, **args)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = _grads(naive_window_attention, q64, k64, v64, g.double(), key_weight=key_weight.double(),
                  **{a: b for a, b in args.items() if a != "key_weight"})
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a.double() - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_the_reference_does_not_underflow_in_fp32():
    """Rows with no far key and logits of -144: the reference's shift is the row's largest weight, not 0."""
    q = torch.full((1, 1, 8, 1), 12.0)
    k = torch.full((1, 1, 8, 1), -12.0)
    v = torch.arange(8.0).view(1, 1, 8, 1)
    out = naive_window_attention(q, k, v, scale=1.0, exact_window=4, causal=True)
    torch.testing.assert_close(out[0, 0, :4, 0], torch.tensor([0.0, 0.5, 1.0, 1.5]))
