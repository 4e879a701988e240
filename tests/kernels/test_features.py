import math

import pytest
import torch

from almostlinear.kernels import feature_rank, taylor_coefficients, validate_polynomial
from almostlinear.kernels.features import (FeatureMap, Quad2Features, evaluate_polynomial,
                                           evaluate_polynomial_derivative)


def test_taylor():
    assert taylor_coefficients(2) == (1.0, 1.0, 0.5)
    assert taylor_coefficients(4)[4] == pytest.approx(1 / 24)
    assert feature_rank(64, 2) == 2145


@pytest.mark.parametrize("degree", [0, 1, 3, -2, 2.0, True, "2"])
def test_bad_degree(degree):
    with pytest.raises(ValueError, match="degree"):
        validate_polynomial(degree)


@pytest.mark.parametrize("coeffs,match", [
    ((1.0, 1.0), "degree \\+ 1"),
    ((1.0, 1.0, -0.5), "leading coefficient"),
    ((1.0, 3.0, 0.5), "not positive"),       # min at s=-3: 1 - 9 + 4.5 < 0
    ((0.0, 0.0, 1.0), "not positive"),       # P(0) = 0
    ((1.0, float("nan"), 0.5), "finite"),
])
def test_bad_coefficients(coeffs, match):
    with pytest.raises(ValueError, match=match):
        validate_polynomial(2, coeffs)


def test_good_coefficients():
    assert validate_polynomial(2, [1, -1, 1]) == (1.0, -1.0, 1.0)
    assert validate_polynomial(4, None) == taylor_coefficients(4)


@pytest.mark.parametrize("fm", [
    FeatureMap(7, 2, (1.0, -0.3, 0.7), 0.37, torch.device("cpu"), torch.float64),
    FeatureMap(5, 4, taylor_coefficients(4), 0.5, torch.device("cpu"), torch.float64),
    Quad2Features(64, (1.0, -0.3, 0.7), 0.37),
    Quad2Features(20, (1.0, 1.0, 0.5), 0.2),
], ids=["packed2", "packed4", "blocked64", "blocked20"])
def test_factorisation_and_vjp(fm):
    d = fm.d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, d, dtype=torch.float64, generator=g)
    y = torch.randn(3, 7, d, dtype=torch.float64, generator=g)
    P = fm.phi(x, "q") @ fm.phi(y, "k").transpose(-1, -2)
    ref = evaluate_polynomial(fm.scale * x @ y.transpose(-1, -2), fm.coeffs)
    assert torch.allclose(P, ref, rtol=1e-10, atol=1e-10)
    for side in "qk":
        gphi = torch.randn(3, 5, fm.rank, dtype=torch.float64, generator=g)
        u = torch.randn(x.shape, dtype=torch.float64, generator=g) * 1e-4
        # central differences of a polynomial of degree <= 4: error O(u^2 * ...) tiny
        fd = ((fm.phi(x + u, side) - fm.phi(x - u, side)) / 2 * gphi).sum()
        an = (fm.vjp(x, gphi, side) * u).sum()
        assert abs((fd - an).item()) <= 1e-6 * abs(an.item()) + 1e-12


def test_poly_derivative():
    s = torch.linspace(-3, 3, 11, dtype=torch.float64)
    c = (1.0, 1.0, 0.5)
    assert torch.allclose(evaluate_polynomial_derivative(s, c), 1 + s)
    assert math.isclose(evaluate_polynomial(torch.tensor(2.0), c).item(), 5.0)


@pytest.mark.parametrize("coeffs", [(0.7,), (1.0, 2.0), (1.0, 1.0, 0.5), (1.0, -0.3, 0.5, 1 / 6, 1 / 24)])
def test_evaluate_polynomial_is_horner_with_and_without_autograd(coeffs):
    """In place without autograd, out of place with it: the same numbers (bitwise), and differentiable."""
    s = torch.randn(257, dtype=torch.float64)
    expected = torch.full_like(s, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        expected = expected * s + c
    assert torch.equal(evaluate_polynomial(s, coeffs), expected)
    sg = s.clone().requires_grad_()
    out = evaluate_polynomial(sg, coeffs)
    assert torch.equal(out.detach(), expected)
    if len(coeffs) > 1:
        (grad,) = torch.autograd.grad(out.sum(), sg)
        assert torch.allclose(grad, evaluate_polynomial_derivative(s, coeffs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", "qk")
def test_bound_features_read_their_inputs_when_called(side):
    """bind_phi_t / bind_vjp_t make the views once; each call computes from the inputs' current values, exactly
    as phi_t / vjp_t do."""
    fm = Quad2Features(16, (1.0, -0.4, 0.6), 0.3)
    g = torch.Generator().manual_seed(1)
    xT = torch.empty(2, 16, 9, dtype=torch.float64)
    dphi = torch.empty(2, fm.rank, 9, dtype=torch.float64)
    out, dx = torch.empty(2, fm.rank, 9, dtype=torch.float64), torch.empty_like(xT)
    phi, vjp = fm.bind_phi_t(xT, side, out), fm.bind_vjp_t(xT, dphi, side, dx)
    for _ in range(2):  # new values in the same tensors
        xT.copy_(torch.randn(xT.shape, generator=g, dtype=torch.float64))
        dphi.copy_(torch.randn(dphi.shape, generator=g, dtype=torch.float64))
        assert phi() is out and torch.equal(out, fm.phi_t(xT.clone(), side))
        assert vjp() is dx and torch.equal(dx, fm.vjp_t(xT.clone(), dphi.clone(), side))
        assert torch.equal(out.transpose(-1, -2), fm.phi(xT.transpose(-1, -2), side))
