"""The denominator's moments (kernels/moments.py) against sum_j w_j P(scale x . k_j) and its autograd gradient."""
import pytest
import torch

from almostlinear.kernels.features import FeatureMap, Quad2Features, evaluate_polynomial
from almostlinear.kernels.moments import FeatureMoments, Quad2Moments, moments_for

SCALE = 0.3


def _direct(xT, yT, w, coeffs):
    """sum_j w_j P(scale x_i . y_j) for every column x_i: xT [..., Gx, D, R], yT [..., 1, D, S], w [..., Gs, S]."""
    s = SCALE * (xT.transpose(-1, -2) @ yT)  # [..., G, R, S]
    return (evaluate_polynomial(s, coeffs) * w.unsqueeze(-2)).sum(-1)


def _maps(d, coeffs):
    return [Quad2Moments(Quad2Features(d, coeffs, SCALE)),
            FeatureMoments(FeatureMap(d, len(coeffs) - 1, coeffs, SCALE, torch.device("cpu"), torch.float64))]


@pytest.mark.parametrize("coeffs", [(1.0, 1.0, 0.5), (0.7, -0.4, 1.3)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("which", [0, 1])
def test_read_and_vjp_match_direct_sum(coeffs, groups, which):
    torch.manual_seed(0)
    d, R, S = 6, 11, 17
    mom = _maps(d, coeffs)[which]
    yT = torch.randn(2, 1, d, S, dtype=torch.float64)
    w = torch.rand(2, groups, S, dtype=torch.float64)
    m = mom.accumulate(yT, w)
    assert m.shape == (2, groups, mom.size)
    for gx in sorted({1, groups}):  # columns shared by the groups (keys) or one set per group (queries)
        xT = torch.randn(2, gx, d, R, dtype=torch.float64, requires_grad=True)
        ref = _direct(xT, yT, w, coeffs)
        x = xT.detach()
        val, cache = mom.read(x, m)
        torch.testing.assert_close(val, ref, rtol=1e-12, atol=1e-12)
        u = torch.randn(2, groups, R, dtype=torch.float64)
        (gref,) = torch.autograd.grad((ref * u).sum(), xT)
        torch.testing.assert_close(mom.vjp(x, m, u, cache), gref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mom.vjp(x, m, u), gref, rtol=1e-12, atol=1e-12)


def test_unweighted_moments_equal_weights_of_one():
    torch.manual_seed(1)
    for mom in _maps(5, (1.0, 1.0, 0.5)):
        yT = torch.randn(3, 1, 5, 9, dtype=torch.float64)
        torch.testing.assert_close(mom.accumulate(yT), mom.accumulate(yT, torch.ones(3, 1, 9, dtype=torch.float64)))
        xT = torch.randn(3, 1, 5, 4, dtype=torch.float64)
        m = mom.accumulate(yT)
        torch.testing.assert_close(mom.vjp(xT, m), mom.vjp(xT, m, torch.ones(3, 1, 4, dtype=torch.float64)))


def test_moments_for_picks_the_compact_form_for_degree_2():
    assert isinstance(moments_for(Quad2Features(8, (1.0, 1.0, 0.5), SCALE)), Quad2Moments)
    fm4 = FeatureMap(4, 4, (1.0, 1.0, 0.5, 1 / 6, 1 / 24), SCALE, torch.device("cpu"), torch.float64)
    assert isinstance(moments_for(fm4), FeatureMoments)
