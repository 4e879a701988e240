"""Measuring with the approximate op materialised (rewriter/measure.materialised_op): the same function as the op,
outputs and gradients, so that planning at short lengths need not build rank-r features."""
from __future__ import annotations

import pytest
import torch

from almostlinear.kernels import taylor_coefficients
from almostlinear.rewriter.measure import POLY_OP, materialised_op
from almostlinear.kernels.switchable import SWITCHABLE_OP

CASES = {  # name -> (causal, window, key weight, ALiBi, GQA groups)
    "plain": (False, 0, False, False, 1),
    "causal_padding_gqa": (True, 0, True, False, 2),
    "window_alibi": (False, 5, False, True, 1),
    "causal_window_padding": (True, 4, True, False, 1),
}


def _inputs(causal, window, padded, alibi, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hk, L, D = 2, 2, 24, 8
    q = 0.3 * torch.randn(B, Hk * groups, L, D, generator=g)
    k, v = (0.3 * torch.randn(B, Hk, L, D, generator=g) for _ in range(2))
    weight = None
    if padded:
        weight = torch.ones(B, L)
        weight[1, :7] = 0.0  # left padding: the first rows of batch 1 see no key (causal)
        v[1, :, :3] = float("nan")  # a padded position's value that must not leak (0 * NaN)
    slopes = torch.tensor([-0.5, -0.25] * groups) if alibi else None
    return q, k, v, weight, slopes


def _grads(out, tensors):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad(out, tensors, cot)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["plain", "all_on", "mixed", "all_off"])
def test_the_materialised_op_equals_the_op(name, mode):
    causal, window, padded, alibi, groups = CASES[name]
    q, k, v, weight, slopes = _inputs(causal, window, padded, alibi, groups)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    coeffs = list(taylor_coefficients(2))
    if mode == "plain":
        target, args = POLY_OP, (q, k, v, weight, slopes, 0.5, coeffs, causal, window)
    else:
        switch = torch.tensor({"all_on": [1, 1], "mixed": [1, 0], "all_off": [0, 0]}[mode], dtype=torch.int8)
        target, args = SWITCHABLE_OP, (q, k, v, weight, slopes, switch, 0.5, coeffs, causal, window)
    got = materialised_op(target, args, {})
    assert got is not None
    want = target(*args)
    # NaN where the op has NaN: the exact heads read a padded NaN value as SDPA does (0 * NaN), the op's do not
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, equal_nan=True)
    for a, b in zip(_grads(got[0].nan_to_num(), (q, k, v)), _grads(want[0].nan_to_num(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)
    if mode in ("plain", "all_on"):
        assert bool(torch.isfinite(got[0]).all())


def test_long_calls_keep_the_op():
    q, k, v = (torch.randn(1, 1, 4096, 8) for _ in range(3))  # 4096 keys >= rank C(10, 2) = 45
    assert materialised_op(POLY_OP, (q, k, v, None, None, 0.5, [1.0, 1.0, 0.5], False, 0), {}) is None
