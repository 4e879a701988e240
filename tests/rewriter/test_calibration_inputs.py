"""Unusual first batches never fail the compile: NaN/inf or huge values in q/k/v, an empty batch.

Calibration fits a polynomial on the logit range and measures errors on the example inputs; on inputs it
cannot use, method="auto" keeps the site exact and says why in the report row, method="polynomial" still
approximates (with Taylor coefficients, nothing to fit on) and says so. Either way the compiled model then
runs on a normal batch.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import almostlinear
from almostlinear.rewriter.calibrate import (CalibrationInputError, calibrate, fitted_coefficients, relative_error,
                                             sampled_output_error)
from almostlinear.rewriter.measure import gradient_error, unusable_reason

SHAPE = (2, 2, 16, 8)


def Bk(**options):
    return almostlinear.Backend(min_seq_len=0, inner=options.pop("inner", "eager"), **options)


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # many compiles of the same code: stay clear of the recompile limit
    yield
    torch._dynamo.reset()


def _qkv(seed=0, shape=SHAPE, kv_shape=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, generator=g)
    k, v = (torch.randn(*(kv_shape or shape), generator=g) for _ in range(2))
    return [t.requires_grad_(True) for t in (q, k, v)]


def _runs_on_a_normal_batch(compiled):
    q, k, v = _qkv(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # polynomial over budget on a recompile for the new shape
        out = compiled(q, k, v)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    return out, (q, k, v)


@pytest.mark.parametrize("method", ["auto", "polynomial"])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_nan_or_inf_in_the_first_batch(method, where, value):
    qkv = _qkv()
    with torch.no_grad():
        qkv[where][0, 1, 3, 2] = value
    backend = Bk(method=method)
    compiled = torch.compile(_Attention(), backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(*qkv).sum().backward()
    row = backend.reports[-1].sites[0]
    name = "qkv"[where]
    if method == "auto":
        assert row.method == "exact", str(backend.reports[-1])
        assert row.reason.startswith(f"kept exact: calibration inputs contain NaN/inf (in {name})"), row.reason
        assert backend.reports[-1].grad_error is None
    else:
        assert row.method == "polynomial" and row.coefficients is None, str(backend.reports[-1])
        assert f"not calibrated (calibration inputs contain NaN/inf (in {name})): Taylor coefficients" in row.reason
        assert not [w for w in caught if "almostlinear" in str(w.message)], "polynomial: information, no warning"
    out, (q, k, v) = _runs_on_a_normal_batch(compiled)
    assert len(backend.reports) == 1, "same shapes: no recompile"
    if method == "auto":
        torch.testing.assert_close(out, _Attention()(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["auto", "polynomial"])
@pytest.mark.parametrize("shape,kv_shape", [((0, 2, 16, 8), None), ((2, 2, 0, 8), None), (SHAPE, (2, 2, 0, 8))],
                         ids=["B=0", "L=0", "S=0"])
def test_empty_first_batch(method, shape, kv_shape):
    backend = Bk(method=method)
    compiled = torch.compile(_Attention(), backend=backend)
    qkv = _qkv(shape=shape, kv_shape=kv_shape)
    out = compiled(*qkv)
    out.sum().backward()
    assert out.shape == _Attention()(*qkv).shape
    row = backend.reports[-1].sites[0]
    # the graph compiled for a size-0 batch serves size-0 batches only (Dynamo specializes 0): nothing to speed up
    assert row.method == "exact" and row.reason.startswith("kept exact: empty batch"), str(backend.reports[-1])
    _runs_on_a_normal_batch(compiled)


@pytest.mark.parametrize("method", ["auto", "polynomial"])
def test_huge_finite_logits_do_not_crash_the_fit(method):
    """Logits beyond ~700 overflow exp in float64: no fit (it crashed lstsq), the error is unbounded."""
    q, k, v = _qkv()
    with torch.no_grad():
        q.mul_(1000.0)
    backend = Bk(method=method)
    compiled = torch.compile(_Attention(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(q, k, v).sum().backward()
    row = backend.reports[-1].sites[0]
    assert row.method == ("exact" if method == "auto" else "polynomial"), str(backend.reports[-1])
    assert row.logit_bound > 700 and row.coefficients is None
    _runs_on_a_normal_batch(compiled)


def test_a_recheck_on_a_nan_batch_keeps_the_site_and_says_it_did_not_measure():
    backend = Bk(method="polynomial", budget=0.5, recheck_every=1)
    compiled = torch.compile(_Attention(), backend=backend)
    compiled(*_qkv()).sum().backward()  # call 1: compiled, re-checked, kept
    report = backend.reports[-1]
    qkv = _qkv(seed=1)
    with torch.no_grad():
        qkv[0][0, 0, 0, 0] = math.nan
    compiled(*qkv).sum().backward()  # call 2: nothing to measure on
    checks = [h for h in report.history if h.get("call") == 2]
    assert checks[0]["site"] == 0 and checks[0]["decision"] == "polynomial", checks
    assert "not measured: calibration inputs contain NaN/inf (in q)" in checks[0]["event"]
    assert "skipped" in checks[1]["event"]
    assert report.sites[0].method == "polynomial"
    _runs_on_a_normal_batch(compiled)  # call 3: measured again
    assert [h["decision"] for h in report.history if h.get("call") == 3 and "site" in h] == ["polynomial"]
    assert len(backend.reports) == 1


def test_budget_helpers_on_unusable_numbers():
    for bound in (math.inf, math.nan, 0.0, 800.0):
        assert fitted_coefficients(2, bound) is None
    assert relative_error([1.0, 1.0, 0.5], math.nan) == math.inf
    q, k, v = _qkv()
    with torch.no_grad():
        k[0, 0, 0, 0] = math.inf
    assert unusable_reason(q, k, v) == "calibration inputs contain NaN/inf (in k)"
    assert unusable_reason(q[:0], k[:0], v[:0]).startswith("empty batch")
    with pytest.raises(CalibrationInputError, match="NaN/inf"):
        calibrate(q, k, v, 0.25, 2, 0.05)
    q, k, v = (t.detach() for t in _qkv())
    index = torch.arange(4)
    assert sampled_output_error(q * 1e20, k * 1e20, v, 1.0, [1.0, 1.0, 0.5], False, 0, index) == math.inf
    ref = [torch.tensor([1.0, math.nan])]
    assert math.isnan(gradient_error([torch.ones(2)], ref))
    assert gradient_error([torch.tensor([math.nan, 1.0])], [torch.ones(2)]) == math.inf
