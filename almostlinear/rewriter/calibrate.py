"""Calibration: the logit range of a site on example inputs, the polynomial's error on it, the coefficients.

For one site's captured q/k/v (and its key weight and ALiBi slopes, as the op takes them): B = max |scale q.k|
on sampled queries (the paper's bound), eps = max relative error of P against exp on [-B, B], the error of the
op's output against exact attention on the sampled queries with their keys and masks, the degree the paper's
bound asks for, and Taylor or fitted coefficients (whichever measures better). Every number that chooses
is agreed across ranks (measure.agree), so all ranks fit and decide alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels import evaluate_polynomial, taylor_coefficients, validate_polynomial
from ..kernels import allowed_keys
from ..passes.graph_utils import example_value
from ..passes.match import AttentionSite
from ..passes.rewrite_polynomial import alibi_per_query_head, static_key_weight, term_key_weight
from .measure import agree, finite_or_inf, unusable_reason


def relative_error(coefficients: Sequence[float], bound: float, points: int = 2001) -> float:
    """eps = max over s in [-B, B] of |P(s) - exp(s)| / exp(s) (inf where exp overflows float64, or B is not
    a finite number)."""
    if not math.isfinite(bound) or bound > 600:
        return math.inf
    s = torch.linspace(-bound, bound, points, dtype=torch.float64)
    p = evaluate_polynomial(s, coefficients)
    return float(((p - s.exp()).abs() / s.exp()).max())


def fitted_coefficients(degree: int, bound: float) -> tuple[float, ...] | None:
    """A positive polynomial fitted to exp on [-B, B] (least squares of the relative error), or None.

    None too where no fit exists: B not a finite number > 0, or a basis that overflows float64 (B > ~700).
    """
    if not (math.isfinite(bound) and 0 < bound <= 600):
        return None
    s = torch.linspace(-bound, bound, 801, dtype=torch.float64)
    basis = torch.stack([s**j * torch.exp(-s) for j in range(degree + 1)], dim=1)
    if not bool(torch.isfinite(basis).all()):
        return None
    coeffs = torch.linalg.lstsq(basis, torch.ones_like(s).unsqueeze(1)).solution.squeeze(1)
    try:
        return validate_polynomial(degree, [float(c) for c in coeffs])
    except ValueError:
        return None


def paper_degree(bound: float, budget: float, max_degree: int = 64) -> int:
    """Smallest even Taylor degree whose relative error bound 2 eps / (1 - eps) fits the budget."""
    for degree in range(2, max_degree + 1, 2):
        eps = relative_error(taylor_coefficients(degree), bound)
        if eps < 1 and 2 * eps / (1 - eps) <= budget:
            return degree
    return max_degree


@dataclass
class Calibration:
    sampled_error: float  # relative output error of the op vs exact on sampled queries (all their keys)
    logit_bound: float  # B: max |scale * q.k| on a sample of the example inputs
    eps: float
    predicted_error: float  # 2 eps / (1 - eps) * max|V|
    paper_degree: int
    degree: int
    coefficients: tuple[float, ...]
    fitted: bool


def sampled_output_error(q, k, v, scale: float, coefficients: Sequence[float], causal: bool, window: int,
                         index: torch.Tensor, key_weight: torch.Tensor | None = None,
                         alibi_slopes: torch.Tensor | None = None) -> float:
    """||A_poly V - A_exp V|| / ||A_exp V|| for the sampled queries against all their keys (no n x n), with
    the site's masks: causal/window, the per-key weight [B, S] and ALiBi slopes [Hq] (the op's semantics).
    Rows with no allowed key are left out (both sides are undefined there).

    inf where it is not a number (logits that overflow float32 make both sides NaN).
    """
    qs = q.index_select(-2, index).float()
    logits = scale * (qs @ k.float().transpose(-2, -1))  # [B, H, m, S]
    S = k.shape[-2]
    allowed = allowed_keys(index.reshape(-1, 1), S, causal, window).expand_as(logits)
    bias = torch.zeros_like(logits)
    if key_weight is not None:
        kw = key_weight.float().reshape(key_weight.shape[0], 1, 1, S)
        allowed = allowed & (kw > 0)
        bias = bias + torch.log(kw.clamp_min(1e-38))
    if alibi_slopes is not None:
        j = torch.arange(S, device=q.device, dtype=torch.float32)
        i = index.to(torch.float32).reshape(-1, 1)
        bias = bias + alibi_slopes.float().reshape(1, -1, 1, 1) * (j - i)
    rows = allowed.any(-1, keepdim=True)
    allowed = allowed & rows
    bias = bias.masked_fill(~allowed, float("-inf"))
    exact = torch.softmax(torch.where(rows, logits + bias, 0.0), dim=-1) * rows
    shift = torch.where(rows, bias.amax(-1, keepdim=True), 0.0)
    weights = evaluate_polynomial(logits, coefficients) * torch.exp(bias - shift) * allowed
    poly = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    vf = v.float()
    reference = exact @ vf
    return finite_or_inf(float((poly @ vf - reference).norm() / reference.norm().clamp_min(1e-30)))


class CalibrationInputError(ValueError):
    """The example inputs of a site cannot calibrate it (empty, NaN/inf); the message says why."""


def calibrate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, degree: int, budget: float,
              causal: bool = False, window: int = 0, sample: int = 128, key_weight: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None) -> Calibration:
    """Logit range and measured error on sampled queries, the polynomial's error bound, the degrees.

    q [B, Hq, L, D], k/v [B, Hk, S, D] (GQA groups are repeated here, on the sample only), key_weight
    [B, S] and alibi_slopes [Hq] as the op takes them (the sampled error is that of the masked site). Raises
    CalibrationInputError on inputs it cannot use (see unusable_reason); the budget search checks first.
    """
    reason = unusable_reason(q, k, v)
    if reason is not None:
        raise CalibrationInputError(reason)
    generator = torch.Generator(device="cpu").manual_seed(0)
    L = q.shape[-2]
    index = torch.randperm(L, generator=generator)[:sample].sort().values.to(q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = scale * (q.index_select(-2, index).float() @ k.float().transpose(-2, -1))
    # Under torch.distributed every number that chooses the polynomial is agreed (MAX over ranks), so all
    # ranks fit on the same logit range and pick the same coefficients: no rank runs a different graph.
    bound = agree([max(float(logits.abs().max()), 1e-6)])[0]  # finite inputs, but float32 may overflow: inf
    taylor = taylor_coefficients(degree)
    eps = relative_error(taylor, bound)
    coefficients, fitted = taylor, False
    candidate = fitted_coefficients(degree, bound)
    sampled = sampled_output_error(q, k, v, scale, taylor, causal, window, index, key_weight, alibi_slopes)
    sampled_fit = math.inf
    if candidate is not None:
        sampled_fit = sampled_output_error(q, k, v, scale, candidate, causal, window, index, key_weight,
                                           alibi_slopes)
    sampled, sampled_fit = agree([sampled, sampled_fit])
    if candidate is not None and sampled_fit < 0.8 * sampled:
        candidate = tuple(agree(candidate))  # bit-identical on every rank even if lstsq differs in the last ulp
        coefficients, fitted, sampled = candidate, True, sampled_fit
        eps = relative_error(candidate, bound)
    relative = 2 * eps / (1 - eps) if eps < 1 else math.inf
    return Calibration(
        sampled_error=sampled,
        logit_bound=bound,
        eps=eps,
        predicted_error=relative * float(v.abs().max()) if float(v.abs().max()) > 0 else 0.0,
        paper_degree=paper_degree(bound, budget),
        degree=degree,
        coefficients=tuple(coefficients),
        fitted=fitted,
    )


def key_weight_value(site: AttentionSite, values: dict, q: torch.Tensor) -> torch.Tensor | None:
    """The per-key weight [B, S] that `_key_weight` builds in the graph, computed from the values of the key
    mask terms (`values`: node -> tensor, from a run of the graph) for calibration."""
    weight = static_key_weight(site)
    for term in site.mask.key_mask:
        leaf = values.get(term.node)
        if leaf is None:
            return None
        w = term_key_weight(leaf, term.kind, float(term.factor))
        weight = w if weight is None else weight * w
    return None if weight is None else weight * torch.ones(q.shape[0], 1, device=q.device)


def alibi_value(site: AttentionSite, q: torch.Tensor) -> torch.Tensor | None:
    slopes = alibi_per_query_head(site) if site.mask.alibi_slopes is not None else None
    return None if slopes is None else torch.tensor(slopes, dtype=torch.float32, device=q.device)


def site_scale(site: AttentionSite) -> float:
    """The factor on q.k of the captured q (pre-scaled q already holds its own factor); symbolic factors by
    their hints."""
    scale = site.constant_scale
    for factor, divide in site.scale_factors:
        value = example_value(factor)
        hint = getattr(getattr(value, "node", None), "hint", None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            hint = None  # a 0-d tensor's value is not known from its fake; stays conservative
        if hint is None:
            continue
        scale = scale / float(hint) if divide else scale * float(hint)
    return scale
