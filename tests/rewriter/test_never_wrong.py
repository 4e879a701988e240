"""Regression tests from the bad-input battery (issue "Never wrong, never crashed"): masks and rows."""
from __future__ import annotations

import math

import pytest
import torch

import almostlinear


def Bk(**options):
    return almostlinear.Backend(min_seq_len=0, inner="eager", **options)


class StaticKeyMask(torch.nn.Module):
    """A registered mask that removes the same key (the last one) for every query."""

    def __init__(self, T: int):
        super().__init__()
        keep = torch.ones(T, T, dtype=torch.bool)
        keep[:, -1] = False
        self.register_buffer("keep", keep)

    def forward(self, q, k, v):
        return (q @ k.mT / 32**0.5).masked_fill(~self.keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("method", ["auto", "polynomial"])
def test_static_per_key_mask_is_kept_on_the_polynomial_path(method):
    T = 256
    torch.manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, T, 32) for _ in range(3))
    model = StaticKeyMask(T)
    backend = Bk(method=method)
    compiled = torch.compile(model, backend=backend)
    compiled(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.mask_kind == "key_padding" and site.method == "polynomial", backend.reports[-1]
    v2 = v.clone()
    v2[:, :, -1] = 5.0  # the masked key's value must never reach the output
    expected, got = model(q, k, v2), compiled(q, k, v2)
    assert float((got - expected).norm() / expected.norm()) < 0.02


class CausalBufferSlice(torch.nn.Module):
    """nanoGPT: a registered tril buffer sliced to the length."""

    def __init__(self, block: int = 512):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, q, k, v):
        T = q.shape[-2]
        att = (q @ k.mT) * (1.0 / q.shape[-1] ** 0.5)
        return att.masked_fill(~self.bias[:T, :T], float("-inf")).softmax(-1) @ v


class CausalArange(torch.nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        att = (q @ k.mT) / 4.0
        return att.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1) @ v


class CausalUntil(torch.nn.Module):
    """A mask that is causal only for the first 64 positions (full attention among later ones): its
    structure depends on the length, so the site must be specialised, never treated as causal."""

    def __init__(self):
        super().__init__()
        keep = torch.ones(512, 512, dtype=torch.bool)
        keep[:64, :64] = torch.tril(keep[:64, :64])
        self.register_buffer("keep", keep)

    def forward(self, q, k, v):
        T = q.shape[-2]
        return ((q @ k.mT) / 4.0).masked_fill(~self.keep[:T, :T], float("-inf")).softmax(-1) @ v


LENGTHS = [40, 56, 64, 80, 96, 120, 136, 160, 200, 232]


@pytest.mark.parametrize("model_class", [CausalBufferSlice, CausalArange])
def test_dynamic_lengths_keep_one_graph_and_stay_exact(model_class):
    model = model_class()
    backend = Bk(method="exact")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T in LENGTHS:
        q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(backend.reports) <= 2
    assert backend.reports[-1].sites[0].mask_kind == "causal"


def test_a_mask_whose_structure_changes_with_length_is_specialised():
    model = CausalUntil()
    backend = Bk(method="exact")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T in (40, 64, 96):
        q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5)
    kinds = [r.sites[0].mask_kind for r in backend.reports]
    assert len(backend.reports) == 3 and kinds[-1] == "dense", kinds


def test_calibration_measures_the_masked_site():
    """The sampled error is that of the site the op computes: key weights and ALiBi included."""
    from almostlinear.kernels import taylor_coefficients
    from almostlinear.rewriter.calibrate import sampled_output_error

    torch.manual_seed(0)
    B, H, L, D = 2, 2, 48, 8
    q, k = (0.5 * torch.randn(B, H, L, D) for _ in range(2))
    v = torch.randn(B, H, L, D)
    v[1, :, -5:] = 100.0  # masked keys with large values: an unmasked estimate would be far off
    kw = torch.ones(B, L)
    kw[1, -5:] = 0.0
    slopes = torch.tensor([-0.25, -0.5])
    coeffs = taylor_coefficients(2)
    index = torch.arange(0, L, 3)
    i, j = torch.arange(L)[:, None].float(), torch.arange(L)[None, :].float()
    s = 0.3 * q @ k.mT
    bias = slopes.reshape(1, H, 1, 1) * (j - i) + torch.log(kw.clamp_min(1e-38)).reshape(B, 1, 1, L)
    causal = j <= i
    exact = torch.softmax((s + bias).masked_fill(~causal, float("-inf")), -1) @ v
    w = (1 + s + s * s / 2) * torch.exp(bias) * causal
    poly = (w / w.sum(-1, keepdim=True)) @ v
    expected = float((poly - exact)[:, :, index].norm() / exact[:, :, index].norm())
    got = sampled_output_error(q, k, v, 0.3, coeffs, True, 0, index, kw, slopes)
    assert abs(got - expected) < 1e-4 * max(expected, 1e-3)


class Plain(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.mT / 4.0).softmax(-1) @ v


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_dynamic_lengths_choose_the_op_at_run_time(inner):
    """One graph for every length; the op runs from min_seq_len on and exact attention below it."""
    model = Plain()
    backend = almostlinear.Backend(method="polynomial", inner=inner, min_seq_len=100)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    torch.manual_seed(0)
    for T in LENGTHS:
        q, k, v = (torch.randn(1, 2, T, 16, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v)
        out.sum().backward()
        exact = model(q, k, v)
        error = float(((out - exact).norm() / exact.norm()).detach())
        if T < 100:
            assert error < 1e-5, (T, error)
        else:
            assert 1e-4 < error < 0.5, (T, error)  # the approximation, not exact attention
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert len(backend.reports) <= 2
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial" and "run time" in site.reason, backend.reports[-1]


# ---- rows whose every key is masked (issue item 5): eager's value on every path ----------------------------
MIN = torch.finfo(torch.float32).min
T_ROWS = 32


def _fill_inf(s, pad):
    return s.masked_fill(~pad[:, None, None, :], float("-inf"))


def _fill_min(s, pad):
    return s.masked_fill(~pad[:, None, None, :], MIN)


def _where_min(s, pad):  # HF: an additive mask where(allowed, 0, finfo.min)
    return s + torch.where(pad[:, None, None, :], 0.0, MIN)


def _bert_additive(s, pad):  # BERT: (1 - mask) * finfo.min as an additive per-key mask
    return s + (1.0 - pad[:, None, None, :].float()) * MIN


def _hf_causal(s, pad):  # HF causal LMs: causal and padding in one where(allowed, 0, finfo.min)
    i = torch.arange(s.shape[-1])
    allowed = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
    return s + torch.where(allowed, 0.0, MIN)


ROW_MASKS = {"fill_inf": _fill_inf, "fill_min": _fill_min, "where_min": _where_min, "bert": _bert_additive,
             "hf_causal": _hf_causal}


class Masked(torch.nn.Module):
    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn

    def forward(self, q, k, v, pad):
        return self.mask_fn(q @ k.mT / 8**0.5, pad).softmax(-1) @ v


def _pad_with_empty_rows(causal: bool) -> torch.Tensor:
    pad = torch.ones(2, T_ROWS, dtype=torch.bool)
    if causal:
        pad[1, :5] = False  # left padding: queries 0..4 of batch 1 see no key
    else:
        pad[1, :] = False  # batch 1 is all padding
    return pad


@pytest.mark.parametrize("name", sorted(ROW_MASKS))
def test_fully_masked_rows_get_eagers_value_on_the_polynomial_path(name):
    torch.manual_seed(0)
    model = Masked(ROW_MASKS[name])
    pad = _pad_with_empty_rows(name == "hf_causal")
    q, k = (0.05 * torch.randn(2, 2, T_ROWS, 8) for _ in range(2))
    v = torch.randn(2, 2, T_ROWS, 8)
    backend = Bk(method="polynomial")
    compiled = torch.compile(model, backend=backend)

    def run(fn):
        args = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*args, pad)
        keep = ~out.isnan()  # a loss over the rows that have a value (eager's NaN rows excluded)
        (out.nan_to_num(0) * keep * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return [out] + [a.grad for a in args]

    expected, got = run(model), run(compiled)
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial", backend.reports[-1]
    assert torch.equal(got[0].isnan(), expected[0].isnan())
    torch.testing.assert_close(got[0].nan_to_num(0), expected[0].nan_to_num(0), atol=5e-3, rtol=5e-3)
    # dv: the rows' mean reaches v. With -inf, eager's NaN rows make its whole dv NaN for that batch element
    # (0 * NaN); ours stays finite there, and equal elsewhere.
    rows = slice(0, 1) if name == "fill_inf" else slice(None)
    torch.testing.assert_close(got[3][rows], expected[3][rows], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("name", sorted(ROW_MASKS))
def test_fully_masked_rows_get_eagers_value_on_the_exact_path(name):
    """Values as eager on every row (NaN for -inf, the mean for finfo.min) and dv as eager. dq/dk as eager where
    the mask replaces the scores (masked_fill); an additive finfo.min row's value does not depend on q or k
    (rounding), and the rewrite gives that zero gradient where eager differentiates the rounded-away scores."""
    torch.manual_seed(0)
    model = Masked(ROW_MASKS[name])
    pad = _pad_with_empty_rows(name == "hf_causal")
    q, k, v = (torch.randn(2, 2, T_ROWS, 8) for _ in range(3))
    compiled = torch.compile(model, backend=Bk(method="exact"))

    def run(fn):
        args = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*args, pad)
        keep = ~out.isnan()
        (out.nan_to_num(0) * keep * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return [out] + [a.grad for a in args]

    expected, got = run(model), run(compiled)
    assert torch.equal(got[0].isnan(), expected[0].isnan())
    torch.testing.assert_close(got[0].nan_to_num(0), expected[0].nan_to_num(0), atol=1e-5, rtol=1e-5)
    rows = slice(0, 1) if name == "fill_inf" else slice(None)  # eager's dv is NaN next to a NaN row
    torch.testing.assert_close(got[3][rows], expected[3][rows], atol=1e-5, rtol=1e-5)
    if name == "fill_min":
        for a, b in zip(got[1:3], expected[1:3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class CausalSdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("model_class", [CausalSdpa, CausalBufferSlice, CausalArange])
def test_dynamic_true_over_ten_lengths_uses_the_op_in_at_most_two_graphs(model_class):
    model = model_class()
    backend = Bk(method="polynomial")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T in LENGTHS:
        q, k, v = (0.1 * torch.randn(1, 2, T, 16) for _ in range(3))
        exact = model(q, k, v)
        assert float((compiled(q, k, v) - exact).norm() / exact.norm()) < 0.01
    assert len(backend.reports) <= 2
    assert all(s.method == "polynomial" for r in backend.reports for s in r.sites), backend.reports[-1]


# ---- a gradient error that is not finite (issue 25): a warning, and exact sites under auto ------------------
class TwoSites(torch.nn.Module):
    def forward(self, q, k, v):
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(x, k, v)


@pytest.mark.parametrize("method", ["auto", "polynomial"])
def test_a_gradient_error_that_is_not_finite_warns_and_auto_keeps_every_site_exact(method, monkeypatch):
    """The measured error is made NaN on the approximated graph (a NaN no site can be blamed for): the report
    and `warnings` say so; auto keeps every site exact (and measures again), polynomial keeps them with the
    warning."""
    from almostlinear.rewriter import search

    real = search.gradient_error
    monkeypatch.setattr(search, "gradient_error", lambda grads, ref: math.nan if any(
        g is not r for g, r in zip(grads, ref)) and not _all_equal(grads, ref) else real(grads, ref))
    torch.manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    backend = Bk(method=method)
    with pytest.warns(RuntimeWarning, match="gradient error is nan"):
        torch.compile(TwoSites(), backend=backend)(q, k, v).sum().backward()
    report = backend.reports[-1]
    assert report.warnings and "gradient error is nan" in str(report), str(report)
    methods = {s.method for s in report.sites}
    assert methods == ({"exact"} if method == "auto" else {"polynomial"}), str(report)
    if method == "auto":
        assert all("not finite" in s.reason for s in report.sites), str(report)
        assert report.grad_error == 0.0, str(report)


def _all_equal(grads, ref) -> bool:
    return all(torch.equal(g, r) for g, r in zip(grads, ref))


@pytest.mark.parametrize("method", ["exact", "polynomial"])
def test_attention_applied_to_an_attention_output_is_rewritten_in_order(method):
    """The second site reads the first one's output as its query: the rewrite of the second must read the node
    that replaced the first (it read the erased node: 'used before it has been defined')."""
    torch.manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, 2, 32, 8) for _ in range(3))
    backend = Bk(method=method)
    out = torch.compile(TwoSites(), backend=backend)(q, k, v)
    assert [s.method for s in backend.reports[-1].sites] == [method] * 2, str(backend.reports[-1])
    torch.testing.assert_close(out, TwoSites()(q, k, v), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["auto", "polynomial", "exact"])
def test_a_call_with_an_empty_sequence_compiles_and_equals_eager(method):
    """A batch with no tokens: its masks are empty (nothing to classify; it crashed the classifier once), the site
    runs exact and the output is eager's empty one."""
    from almostlinear.zoo import GPT, GPTConfig

    torch._dynamo.reset()
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids = torch.zeros(2, 0, dtype=torch.long)
    backend = almostlinear.Backend(method=method, min_seq_len=0, inner="eager")
    out = torch.compile(model, backend=backend, dynamic=False)(ids)
    assert torch.equal(out, model(ids))
    assert "the scores are empty" in backend.reports[-1].sites[0].reason
