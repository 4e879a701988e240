"""Calibration: coefficients fitted where the attention is, positive, and never worse than Taylor."""
import math

import pytest
import torch

from almostlinear.kernels import taylor_coefficients, validate_polynomial
from almostlinear.rewriter.calibrate import calibrate, candidate_error, mass_fitted_coefficients, sample_attention


def _qkv(logit_std, seed=0, heads=4, L=256, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, L, d, generator=g) * logit_std ** 0.5
    k = torch.randn(2, heads, L, d, generator=g) * logit_std ** 0.5 / d ** 0.5
    v = torch.randn(2, heads, L, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("logit_std", [0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("causal", [False, True])
def test_mass_fit_is_positive(logit_std, causal):
    """Where the unconstrained weighted fit dips below zero (larger logits), the positive form c (s - m)^2 + b
    is fitted instead: the op's denominators need P > 0."""
    q, k, v = _qkv(logit_std)
    sample = sample_attention(q, k, v, 1.0, causal, 0, torch.arange(0, 256, 2))
    fitted = mass_fitted_coefficients(sample, 2)
    assert fitted is not None and validate_polynomial(2, fitted) == fitted  # P(s) > 0 for every real s


@pytest.mark.parametrize("causal", [False, True])
def test_mass_fit_beats_taylor_on_small_logits(causal):
    q, k, v = _qkv(0.5)
    sample = sample_attention(q, k, v, 1.0, causal, 0, torch.arange(0, 256, 2))
    taylor = candidate_error(sample, taylor_coefficients(2))
    assert candidate_error(sample, mass_fitted_coefficients(sample, 2)) < 0.95 * taylor


@pytest.mark.parametrize("logit_std", [0.5, 1.5, 3.0])
def test_calibration_is_never_worse_than_taylor(logit_std):
    q, k, v = _qkv(logit_std)
    cal = calibrate(q, k, v, 1.0, 2, budget=0.05)
    index = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:128].sort().values
    taylor = candidate_error(sample_attention(q, k, v, 1.0, False, 0, index), taylor_coefficients(2))
    assert cal.sampled_error <= taylor * (1 + 1e-5)  # the same error, summed per head (float rounding)
    assert (cal.fit == "Taylor") == (not cal.fitted) and validate_polynomial(2, cal.coefficients)


def test_calibration_maps_every_head():
    q, k, v = _qkv(1.5)
    cal = calibrate(q, k, v, 1.0, 2, budget=0.05)
    assert [h.head for h in cal.heads] == [0, 1, 2, 3] and len(cal.group_errors) == 4
    assert all(1 <= h.effective_keys <= 256 and h.logit_std > 0 for h in cal.heads)


def test_sharper_heads_have_fewer_effective_keys_and_larger_errors():
    q, k, v = _qkv(0.3, heads=2)
    q[:, 1] *= 6.0  # head 1: logits 6x larger
    cal = calibrate(q, k, v, 1.0, 2, budget=0.05)
    diffuse, sharp = cal.heads
    assert sharp.logit_std > 4 * diffuse.logit_std
    assert sharp.effective_keys < diffuse.effective_keys
    assert sharp.sampled_error > diffuse.sampled_error
    assert cal.group_errors[1] > cal.group_errors[0]


def _mixed_heads(amplitudes, causal_len=512):
    torch.manual_seed(0)
    H = len(amplitudes)
    q = torch.randn(1, H, causal_len, 64) * torch.tensor(amplitudes).view(1, H, 1, 1)
    return q, torch.randn(1, H, causal_len, 64), torch.randn(1, H, causal_len, 64)


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_coefficients_are_chosen_on_the_heads_that_can_be_approximated(causal):
    """method="auto" approximates only the heads within budget, so their coefficients are chosen on them: the
    sharp heads' logits no longer pull the fit: at least as many heads fit, and as many only with a smaller
    error on them."""
    q, k, v = _mixed_heads([0.3, 0.5, 2.5, 4.0])
    everyone = calibrate(q, k, v, 1 / 8, 2, budget=0.05, causal=causal)
    chosen = calibrate(q, k, v, 1 / 8, 2, budget=0.05, causal=causal, per_head=True)
    assert everyone.fit_groups is None
    assert chosen.fit_groups is not None and set(chosen.fit_groups) <= {0, 1}
    before = [e for e in everyone.group_errors if e <= 0.05]
    after = [e for e in chosen.group_errors if e <= 0.05]
    assert before and len(after) >= len(before)
    if len(after) == len(before):
        assert sum(e * e for e in after) < sum(e * e for e in before)
    assert validate_polynomial(2, chosen.coefficients)
    if causal:  # here the refit brings head 1 within budget (0.052 -> 0.035)
        assert everyone.group_errors[1] > 0.05 >= chosen.group_errors[1]


def test_per_head_fit_is_the_all_heads_fit_when_every_head_fits():
    q, k, v = _mixed_heads([0.2, 0.3, 0.25])
    everyone = calibrate(q, k, v, 1 / 8, 2, budget=0.05)
    chosen = calibrate(q, k, v, 1 / 8, 2, budget=0.05, per_head=True)
    assert all(e <= 0.05 for e in everyone.group_errors)
    assert chosen.fit_groups is None and chosen.coefficients == everyone.coefficients
    assert chosen.group_errors == everyone.group_errors


def test_per_head_fit_takes_the_query_heads_of_each_key_value_head():
    """GQA (3 query heads per key/value head): the coefficients chosen on a subset of key/value heads are those
    of a calibration of exactly their query heads."""
    q, k, v = _mixed_heads([0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 4.0, 4.0, 4.0], causal_len=256)
    k, v = k[:, ::3].contiguous(), v[:, ::3].contiguous()  # 3 key/value heads
    chosen = calibrate(q, k, v, 1 / 8, 2, budget=0.05, causal=True, per_head=True)
    assert chosen.fit_groups is not None and len(chosen.group_errors) == 3
    heads = [g * 3 + i for g in chosen.fit_groups for i in range(3)]
    alone = calibrate(q[:, heads], k[:, list(chosen.fit_groups)], v[:, list(chosen.fit_groups)], 1 / 8, 2,
                      budget=0.05, causal=True)
    assert chosen.coefficients == alone.coefficients and chosen.fit == alone.fit


# --- the sample and the shared sums (issue 25: planning in seconds) ---------------------------------------------

from almostlinear.rewriter import calibrate as calibration  # noqa: E402


def test_sample_queries_is_deterministic_and_keeps_small_batches_whole():
    rows, index = calibration.sample_queries(2, 256)
    assert rows is None  # 2 x 128 pairs: every row, as before
    assert torch.equal(index, torch.randperm(256, generator=torch.Generator().manual_seed(0))[:128].sort().values)
    rows, index = calibration.sample_queries(16, 256)
    assert rows is None and index.shape == (16, calibration.PAIRS // 16)  # 16 rows x 32 queries, each its own
    assert torch.equal(index, index.sort(-1).values) and all(len(set(r)) == 32 for r in index.tolist())
    assert len(set(index.flatten().tolist())) > 128  # the rows together cover many positions
    rows, index = calibration.sample_queries(64, 512)
    assert index.shape == (len(rows), calibration.MIN_QUERIES) and rows.numel() * index.shape[1] == calibration.PAIRS
    assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == len(rows)
    again = calibration.sample_queries(64, 512)
    assert torch.equal(again[0], rows) and torch.equal(again[1], index)
    assert calibration.sample_queries(3, 5)[1].tolist() == [0, 1, 2, 3, 4]  # short sequences: every query


def _batch_of_heads(amplitudes, B=16, L=256, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = len(amplitudes)
    q = torch.randn(B, H, L, d, generator=g) * torch.tensor(amplitudes).view(1, H, 1, 1)
    return q, torch.randn(B, H, L, d, generator=g), torch.randn(B, H, L, d, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_subsampled_errors_stay_near_the_full_sample(causal):
    """PAIRS (row, query) pairs of a 16-row batch estimate each head's error within 10% of that of every row's
    every query (or of the budget, where the error is far below it), and the same heads fit the budget."""
    q, k, v = _batch_of_heads([0.3, 0.6, 1.0, 2.0, 4.0])
    kw = torch.ones(16, 256)
    kw[8:, 200:] = 0.0  # padded rows
    sub = calibrate(q, k, v, 1 / 8, 2, budget=0.05, causal=causal, key_weight=kw)
    full = calibrate(q, k, v, 1 / 8, 2, budget=0.05, causal=causal, key_weight=kw, sample=256, pairs=16 * 256)
    for a, b in zip(sub.group_errors, full.group_errors):
        assert abs(a - b) <= 0.1 * max(b, 0.05), (sub.group_errors, full.group_errors)
    assert [e <= 0.05 for e in sub.group_errors] == [e <= 0.05 for e in full.group_errors]
    assert sub.fit == full.fit


def _points(sample):
    return sample.logits[sample.allowed].double(), sample.exact[sample.allowed].double()


def _direct_fit(s, w, degree):
    """The weighted normal equations summed over the points themselves (the oracle of the moment sums)."""
    basis = torch.stack([s**j * torch.exp(-s) for j in range(degree + 1)], dim=1)
    gram, rhs = (basis * w.unsqueeze(-1)).T @ basis, (basis * w.unsqueeze(-1)).sum(0)
    return torch.linalg.solve(gram, rhs)


def _direct_positive_quadratic(s, w, centers=65):
    m = torch.linspace(-float(s.abs().max()), float(s.abs().max()), centers, dtype=torch.float64).unsqueeze(-1)
    decay = torch.exp(-s)
    basis = torch.stack([(s - m) ** 2 * decay, decay.expand_as(s - m)], dim=-1)  # [M, N, 2]
    weighted = basis * w.unsqueeze(-1)
    gram, rhs = weighted.transpose(-2, -1) @ basis, weighted.sum(-2)
    x = torch.linalg.solve(gram, rhs)
    residual = -2 * (x * rhs).sum(-1) + (x.unsqueeze(-2) @ gram @ x.unsqueeze(-1)).flatten()
    ok = (x[:, 0] > 0) & (x[:, 1] > 1e-9)
    best = int(torch.where(ok, residual, torch.full_like(residual, float("inf"))).argmin())
    c, b, vertex = float(x[best, 0]), float(x[best, 1]), float(m[best, 0])
    return [c * vertex * vertex + b, -2 * c * vertex, c]


@pytest.mark.parametrize("degree", [2, 4])
def test_mass_fit_from_moments_is_the_fit_on_the_points(degree):
    q, k, v = _qkv(0.5)
    sample = sample_attention(q, k, v, 1.0, True, 0, torch.arange(0, 256, 2))
    s, w = _points(sample)
    fitted = mass_fitted_coefficients(sample, degree)
    torch.testing.assert_close(torch.tensor(fitted, dtype=torch.float64), _direct_fit(s, w, degree),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("logit_std", [1.5, 3.0])
def test_positive_quadratic_from_moments_is_the_fit_on_the_points(logit_std):
    q, k, v = _qkv(logit_std)
    sample = sample_attention(q, k, v, 1.0, False, 0, torch.arange(0, 256, 2))
    s, w = _points(sample)
    with pytest.raises(ValueError):  # the unconstrained fit dips below zero here
        validate_polynomial(2, [float(c) for c in _direct_fit(s, w, 2)])
    torch.testing.assert_close(torch.tensor(mass_fitted_coefficients(sample, 2)),
                               torch.tensor(_direct_positive_quadratic(s, w)), rtol=1e-5, atol=1e-8)


def test_per_head_sums_give_the_errors_and_statistics_of_the_sample():
    """The errors from the per-head sums are those of the op's output on the sample; the per-head statistics
    those of each head's allowed logits."""
    q, k, v = _qkv(1.5)
    sample = sample_attention(q, k, v, 1.0, True, 0, torch.arange(0, 256, 2))
    drawn = calibration._Drawn(sample, 2, 1)
    for coefficients in (taylor_coefficients(2), mass_fitted_coefficients(sample, 2)):
        everything = calibration._Heads(drawn, (0, 1, 2, 3))
        assert candidate_error(everything, coefficients) == pytest.approx(candidate_error(sample, coefficients),
                                                                          rel=1e-5)
        one = sample_attention(q[:, 2:3], k[:, 2:3], v[:, 2:3], 1.0, True, 0, torch.arange(0, 256, 2))
        assert candidate_error(calibration._Heads(drawn, (2,)), coefficients) == pytest.approx(
            candidate_error(one, coefficients), rel=1e-5)
    heads, _ = drawn.stats(taylor_coefficients(2))
    for h, stats in enumerate(heads):
        logits = sample.logits[:, h][sample.allowed[:, h]]
        assert stats.logit_std == pytest.approx(float(logits.std()), rel=1e-5)
        assert stats.logit_max == pytest.approx(float(logits.abs().max()), rel=1e-6)


def test_heads_far_over_budget_are_not_fitted(monkeypatch):
    """method="auto": a key/value head over FAR x the budget under the all-heads fit is never added to a per-head
    fit (it could not come within budget); the decisions are those of trying it."""
    q, k, v = _mixed_heads([0.3, 0.4, 6.0, 8.0])
    fits = []
    real = calibration._group_fit
    monkeypatch.setattr(calibration, "_group_fit", lambda drawn, chosen: fits.append(chosen) or real(drawn, chosen))
    skipping = calibrate(q, k, v, 1 / 8, 2, budget=0.05, per_head=True)
    assert all(e > calibration.FAR * 0.05 for e in skipping.group_errors[2:])
    assert fits == [None, (0, 1)]  # all heads, then the two within budget; heads 2 and 3 never
    fits.clear()
    monkeypatch.setattr(calibration, "FAR", math.inf)
    trying = calibrate(q, k, v, 1 / 8, 2, budget=0.05, per_head=True)
    assert fits == [None, (0, 1), (0, 1, 2)]
    assert [e <= 0.05 for e in trying.group_errors] == [e <= 0.05 for e in skipping.group_errors]
    assert trying.fit_groups == skipping.fit_groups and trying.coefficients == skipping.coefficients


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_error_with_an_exact_window_is_that_of_the_windowed_op(causal):
    """The sample's error (the per-head sums that decide, and candidate_error) is the windowed op's error against
    softmax on the sampled queries: the naive windowed reference computed on all queries, read at the sample."""
    from almostlinear.kernels import naive_exact_attention, naive_window_attention
    q, k, v = _qkv(1.5, L=128)
    index = torch.arange(0, 128, 3)
    coeffs = (1.0, 0.9, 0.45)
    sample = sample_attention(q, k, v, 1.0, causal, 0, index, exact_window=8)
    want_out = naive_window_attention(q.double(), k.double(), v.double(), scale=1.0, exact_window=8, causal=causal,
                                      coefficients=coeffs)[:, :, index]
    exact = naive_exact_attention(q.double(), k.double(), v.double(), scale=1.0, causal=causal)[:, :, index]
    want = float((want_out - exact).norm() / exact.norm())
    assert candidate_error(sample, coeffs) == pytest.approx(want, rel=1e-4)
    cal = calibrate(q, k, v, 1.0, 2, budget=0.05, causal=causal, exact_window=8)  # samples all 128 queries here
    every = naive_window_attention(q.double(), k.double(), v.double(), scale=1.0, exact_window=8, causal=causal,
                                   coefficients=cal.coefficients)
    exact_all = naive_exact_attention(q.double(), k.double(), v.double(), scale=1.0, causal=causal)
    assert cal.sampled_error == pytest.approx(float((every - exact_all).norm() / exact_all.norm()), rel=1e-4)
    plain = candidate_error(sample_attention(q, k, v, 1.0, causal, 0, index), coeffs)
    assert want < plain  # the window helps on these logits
