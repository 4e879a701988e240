"""The custom op: opcheck, autograd plumbing, argument validation, exact fallback, edge cases, compile."""
import pytest
import torch

from almostlinear.kernels import (DEFAULT_MIN_SEQ_LEN, default_min_seq_len, mask_kind, naive_exact_attention,
                                  naive_poly_attention, poly_attention)
from almostlinear.kinds import APPROXIMABLE_MASK_KINDS, MaskKind

from tests.kernels.kernel_helpers import make_inputs, rms_ratio

OP = torch.ops.almostlinear.poly_attention.default


def test_public_constants():
    assert APPROXIMABLE_MASK_KINDS == ("none", "causal", "key_padding", "causal+key_padding", "alibi", "window",
                                       "causal+window")
    assert default_min_seq_len("cpu") == DEFAULT_MIN_SEQ_LEN["cpu"]
    assert default_min_seq_len(torch.device("cuda")) == DEFAULT_MIN_SEQ_LEN["cuda"]
    assert default_min_seq_len("cpu", causal=True) >= default_min_seq_len("cpu")
    assert mask_kind(True, torch.ones(1, 2)) is MaskKind.CAUSAL_KEY_PADDING
    assert {mask_kind(c, w, a, n) for c in (False, True) for w in (None, torch.ones(1, 2))
            for a in (None, torch.ones(1)) for n in (0, 3)} == set(APPROXIMABLE_MASK_KINDS)


@pytest.mark.parametrize("args", [
    dict(causal=True), dict(kw=True), dict(alibi=True), dict(window=4), dict(causal=True, window=3, kw=True),
    dict(gqa=True), dict(cross=True), dict(causal=True, keep=True), dict(causal=True, kw=True, gqa=True, keep=True),
], ids=str)
def test_opcheck(args):
    q, k, v, key_weight, slopes = make_inputs(2, 4 if args.get("gqa") else 2, 2 if args.get("gqa") else 2, 11,
                                              13 if args.get("cross") else None, D=4, Dv=3,
                                              kw=args.get("kw", False), alibi=args.get("alibi", False))
    torch.library.opcheck(OP, (q, k, v, key_weight, slopes, 0.4, [1.0, 1.0, 0.5], args.get("causal", False),
                               args.get("window", 0), args.get("keep", False)))


def test_noncontiguous_grad_output():
    q, k, v, _, _ = make_inputs(1, 2, 2, 10, D=4, Dv=6)
    out = poly_attention(q, k, v, scale=0.5, causal=True)
    g = torch.randn(out.shape[:-2] + (out.shape[-1], out.shape[-2])).transpose(-1, -2)
    assert not g.is_contiguous()
    a = torch.autograd.grad(out, (q, k, v), g)
    b = torch.autograd.grad(poly_attention(q, k, v, scale=0.5, causal=True), (q, k, v), g.contiguous())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs,match", [
    (dict(degree=3), "degree"),
    (dict(coefficients=[1.0, 3.0, 0.5]), "not positive"),
    (dict(coefficients=[1.0, 1.0, 0.5, 0.1]), "degree \\+ 1"),
    (dict(causal=True, _cross=True), "L=5, S=7"),
    (dict(window=3, _cross=True), "window"),
    (dict(window=-1), "window"),
    (dict(_heads=(3, 2)), "Hq=3.*Hk=2"),
    (dict(key_weight=torch.ones(1, 4)), "key_weight must have shape"),
    (dict(alibi_slopes=torch.ones(5)), "alibi_slopes"),
])
def test_invalid_arguments(kwargs, match):
    cross = kwargs.pop("_cross", False)
    hq, hk = kwargs.pop("_heads", (2, 1))
    q, k, v, _, _ = make_inputs(1, hq, hk, 5, 7 if cross else 5, D=4, Dv=4, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        poly_attention(q, k, v, scale=0.5, **kwargs)


@pytest.mark.parametrize("kind", ["none", "causal", "causal+key_padding", "alibi", "causal+window", "window"])
def test_exact_fallback_below_min_seq_len(kind):
    causal = kind.startswith("causal")
    window = 4 if "window" in kind else 0
    q, k, v, key_weight, slopes = make_inputs(2, 4, 2, 12, D=8, Dv=4, kw="padding" in kind, alibi=kind == "alibi",
                                              dtype=torch.float64)
    kw = dict(scale=0.4, causal=causal, key_weight=key_weight, alibi_slopes=slopes, window=window)
    out = poly_attention(q, k, v, min_seq_len=13, **kw)
    ref = naive_exact_attention(q, k, v, **kw)
    assert rms_ratio(out, ref) < 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rms_ratio(a, b) < 1e-10
    # at S >= min_seq_len the polynomial op runs
    out2 = poly_attention(q, k, v, min_seq_len=12, **kw)
    assert rms_ratio(out2, naive_poly_attention(q, k, v, **kw)) < 1e-12


@pytest.mark.parametrize("min_seq_len", [0, 100])
def test_fully_masked_rows_are_zero_and_finite(min_seq_len):
    q, k, v, _, _ = make_inputs(2, 2, 2, 9, D=4, Dv=4)
    kw = torch.ones(2, 9)
    kw[1] = 0
    out = poly_attention(q, k, v, scale=0.5, key_weight=kw, causal=True, min_seq_len=min_seq_len)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_logits_finite(dtype, causal):
    q, k, v, _, slopes = make_inputs(1, 2, 1, 40, D=16, Dv=8, dtype=dtype, std=30.0, alibi=True)
    slopes = slopes * 0 + torch.tensor([5.0, -5.0])
    out = poly_attention(q, k, v, scale=1.0, causal=causal, alibi_slopes=slopes)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.float().sum(), (q, k, v)))


def test_alibi_long_positions_no_overflow(monkeypatch):
    # j up to 65536 with slope 1: exp(m j) would overflow; the op must stay finite and match a short window
    from almostlinear.kernels import cpu
    monkeypatch.setattr(cpu, "CHUNK", 1024)  # fewer Python iterations; positions are what matter here
    L = 65536 + 64
    q = torch.randn(1, 1, L, 4)
    k, v = torch.randn(1, 1, L, 4), torch.randn(1, 1, L, 2)
    slopes = torch.tensor([1.0])
    out = poly_attention(q, k, v, scale=0.5, causal=True, alibi_slopes=slopes)
    assert torch.isfinite(out).all()
    tail = slice(L - 40, L)
    ref = naive_poly_attention(q[:, :, tail], k[:, :, tail], v[:, :, tail], scale=0.5, causal=True,
                               alibi_slopes=slopes)
    # exp(-m * 30) ~ 1e-13: keys further than ~30 back are negligible
    assert rms_ratio(out[:, :, -10:], ref[:, :, -10:]) < 1e-5
    out_nc = poly_attention(q[:, :, :4096], k, v, scale=0.5, alibi_slopes=-slopes)
    assert torch.isfinite(out_nc).all()


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_inductor_no_graph_break(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")

    def f(q, k, v, kw):
        return poly_attention(q, k, v, scale=0.25, causal=True, key_weight=kw).sum(-1)

    cf = torch.compile(f, backend=cnt, dynamic=dynamic, fullgraph=True)
    for L in (16, 24):
        q, k, v, _, _ = make_inputs(1, 2, 1, L, D=8, Dv=4)
        kw = torch.ones(1, L)
        out = cf(q, k, v, kw)
        ref = f(q, k, v, kw)
        assert torch.allclose(out, ref, atol=1e-5)
        ga = torch.autograd.grad(out.sum(), (q, k, v))
        gb = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, atol=1e-5)
    assert cnt.frame_count == (1 if dynamic else 2)
    torch._dynamo.reset()


@pytest.mark.parametrize("window", [0, 64])
def test_a_nan_key_leaves_the_earlier_queries_as_eager_does(window):
    """Issue 25: a NaN in key j made the outputs of the queries before j in its causal chunk NaN (P(NaN) * 0 in the
    diagonal block); eager's masked softmax keeps them finite. The non-finite pattern now equals eager's and the
    finite rows equal the op's on clean keys."""
    torch.manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, 300, 16) for _ in range(3))
    bad = k.clone()
    bad[0, 0, 200] = float("nan")
    i = torch.arange(300)
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    eager = ((0.25 * q @ bad.mT).masked_fill(~allowed, float("-inf")).softmax(-1)) @ v
    clean = poly_attention(q, k, v, scale=0.25, causal=True, window=window)
    got = poly_attention(q, bad, v, scale=0.25, causal=True, window=window)
    assert torch.equal(torch.isfinite(got), torch.isfinite(eager))
    finite = torch.isfinite(got)
    torch.testing.assert_close(got[finite], clean[finite])
