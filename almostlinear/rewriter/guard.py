"""The run-time logit guard of an approximated site (method="auto"): a batch sharper than the planning batch runs
exact attention instead of breaking the budget unnoticed (issue 25: the budget must hold on the batches that
follow).

The polynomial's error grows with the logits (degree 2 Taylor: about |s|³/6 relative), and a planning batch
says nothing about logits larger than its own. Computing the logits is quadratic, but they are bounded in
linear time: |scale·q_i·k_j| <= |scale|·max_i |q_i|·max_j |k_j| (Cauchy-Schwarz), per key/value head from the
row norms. At planning, each head's bound b on the example batch and its sampled error e give a limit

    limit = b · clamp((budget / e)^(1/3), 1 + SLACK, MAX_GROWTH)

(the logits may grow until the cubic error law predicts the budget, by at least SLACK so that a batch like the
planning one does not trip it, and at most MAX_GROWTH beyond what was measured). In the rewritten graph every
call computes its bound (two row-norm reductions, O(B·H·n·d)) and a head whose bound exceeds its limit runs
exact attention for that call (the switchable op's per-head mode); nothing is recompiled and the next call is
judged on its own inputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..passes.rewrite_polynomial import head_logit_bounds

SLACK = 0.1
MAX_GROWTH = 1.5


def logit_bounds(q: torch.Tensor, k: torch.Tensor, scale: float) -> list[float]:
    """Per key/value head, the bound the rewritten graph computes on every call (`head_logit_bounds`), on the
    captured q [B, Hq, L, D] and k [B, Hk, S, D]."""
    return [float(b) for b in head_logit_bounds(q, k, scale)]


def limits(bounds: Sequence[float], group_errors: Sequence[float], budget: float) -> tuple[float, ...]:
    """The guard's limit per key/value head (see the module docstring); a head with no measured error gets the
    largest growth, one over budget none beyond the slack."""
    out = []
    for bound, error in zip(bounds, group_errors):
        growth = (budget / error) ** (1 / 3) if error > 0 and math.isfinite(error) else MAX_GROWTH
        out.append(bound * min(MAX_GROWTH, max(1 + SLACK, growth)))
    return tuple(out)


def describe(guard: Sequence[float]) -> str:
    return ("run-time guard: a key/value head runs exact on a call whose logit bound |scale|·max|q|·max|k| exceeds "
            f"{', '.join(f'{g:.3g}' for g in guard)} (per head; planning batch x up to {MAX_GROWTH:g})")


__all__ = ["logit_bounds", "limits", "describe", "SLACK", "MAX_GROWTH"]
