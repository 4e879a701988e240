"""Calibration: coefficients fitted where the attention is, positive, and never worse than Taylor."""
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
    assert cal.sampled_error <= taylor
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
