"""Calibration: the logit range of a site on example inputs, the polynomial's error on it, the coefficients.

For one site's captured q/k/v (and its key weight and ALiBi slopes, as the op takes them): B = max |scale q.k|
on sampled queries (the paper's bound), eps = max relative error of P against exp on [-B, B], the error of the
op's output against exact attention on the sampled queries with their keys and masks, the degree the paper's
bound asks for, and Taylor or fitted coefficients (whichever measures better). Every number that chooses
is agreed across ranks (measure.agree), so all ranks fit and decide alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ..kernels import evaluate_polynomial, taylor_coefficients, validate_polynomial
from ..kernels import allowed_keys
from ..passes.graph_utils import example_value
from ..passes.site import AttentionSite
from ..passes.rewrite_polynomial import alibi_per_query_head, static_key_weight, term_key_weight
from .measure import agree, finite_or_inf, summed, unusable_reason


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
class HeadStats:
    """One query head of a calibrated site: how approximable it is on the example inputs."""

    head: int
    logit_std: float  # std of scale * q.k over the sampled queries' allowed keys
    logit_max: float  # max |scale * q.k| there
    effective_keys: float  # exp(entropy) of the exact attention, mean over the sampled queries
    sampled_error: float  # relative output error of the chosen polynomial on this head (sampled queries)


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
    fit: str = "Taylor"  # "Taylor", "range" (fitted on [-B, B]) or "mass" (weighted by the attention mass)
    heads: list[HeadStats] = field(default_factory=list)  # per query head
    group_errors: list[float] = field(default_factory=list)  # sampled error per key/value head (its query heads)
    fit_groups: tuple[int, ...] | None = None  # the key/value heads the coefficients were chosen on (None: all)


@dataclass
class Sample:
    """Exact attention of a site on sampled queries against all their keys, with the site's masks.

    logits [B, H, m, S] (scale * q.k; GQA repeated to H query heads), allowed (bool, same shape), bias
    (log key weight + ALiBi, -inf where not allowed), rows [B, H, m, 1] (the query has an allowed key),
    exact (softmax weights), v [B, H, S, Dv] and reference = exact @ v (all float32)."""

    logits: torch.Tensor
    allowed: torch.Tensor
    bias: torch.Tensor
    rows: torch.Tensor
    exact: torch.Tensor
    v: torch.Tensor
    reference: torch.Tensor


def sample_attention(q, k, v, scale: float, causal: bool, window: int, index: torch.Tensor,
                     key_weight: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> Sample:
    """The Sample of queries `index` (k/v already repeated to q's heads), with the op's mask semantics:
    causal/window, the per-key weight [B, S] and ALiBi slopes [Hq]."""
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
    vf = v.float()
    return Sample(logits, allowed, bias, rows, exact, vf, exact @ vf)


def polynomial_output(sample: Sample, coefficients: Sequence[float]) -> torch.Tensor:
    """The op's output on the sampled queries: weights P(s) * key factors, normalised (rows with no allowed
    key: 0, left out of every error)."""
    shift = torch.where(sample.rows, sample.bias.amax(-1, keepdim=True), 0.0)
    weights = evaluate_polynomial(sample.logits, coefficients) * torch.exp(sample.bias - shift) * sample.allowed
    return (weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)) @ sample.v


def candidate_error(sample: Sample, coefficients: Sequence[float]) -> float:
    """||A_poly V - A_exp V|| / ||A_exp V|| on the sample; inf where it is not a number (logits that overflow
    float32 make both sides NaN)."""
    diff = polynomial_output(sample, coefficients) - sample.reference
    return finite_or_inf(float(diff.norm() / sample.reference.norm().clamp_min(1e-30)))


def sampled_output_error(q, k, v, scale: float, coefficients: Sequence[float], causal: bool, window: int,
                         index: torch.Tensor, key_weight: torch.Tensor | None = None,
                         alibi_slopes: torch.Tensor | None = None) -> float:
    """candidate_error of the sampled queries `index` against all their keys (no n x n), with the site's masks."""
    return candidate_error(sample_attention(q, k, v, scale, causal, window, index, key_weight, alibi_slopes),
                           coefficients)


def _mass_points(sample: Sample, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, exact attention weights) of the allowed pairs, float64, at most `most` (a seeded random subset);
    none where e^-s would overflow float64."""
    s = sample.logits[sample.allowed].double()
    w = sample.exact[sample.allowed].double()
    if s.numel() > most:
        keep = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(1))[:most].to(s.device)
        s, w = s[keep], w[keep]
    if s.numel() and float(s.abs().max()) > 600:
        s, w = s[:0], w[:0]
    return s, w


def _normal_equations(basis: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over points (and over ranks: the union of their samples) of w b bᵀ and w b, for basis [..., N, k]."""
    weighted = basis * w.unsqueeze(-1)
    gram, rhs = weighted.transpose(-2, -1) @ basis, weighted.sum(-2)
    size = basis.shape[-1]
    system = summed(torch.cat([gram.flatten(-2), rhs], dim=-1))  # a collective: every rank takes part
    return system[..., :size * size].unflatten(-1, (size, size)), system[..., size * size:]


def _positive_quadratic(s: torch.Tensor, w: torch.Tensor, centers: int = 65) -> tuple[float, ...] | None:
    """The best P(s) = c (s - m)^2 + b with c > 0, b > 0 (positive for every s) over a grid of vertices m: for
    each m the fit is linear in (c, b); the weighted residual picks m."""
    bound = agree([float(s.abs().max()) if s.numel() else 1e-6])[0]  # one grid on every rank (summed below)
    m = torch.linspace(-bound, bound, centers, dtype=torch.float64, device=s.device).unsqueeze(-1)  # [M, 1]
    decay = torch.exp(-s)
    basis = torch.stack([(s - m) ** 2 * decay, decay.expand_as(s - m)], dim=-1)  # [M, N, 2]
    gram, rhs = _normal_equations(basis, w)
    try:
        x = torch.linalg.solve(gram, rhs)  # [M, 2]
    except RuntimeError:
        return None
    residual = -2 * (x * rhs).sum(-1) + (x.unsqueeze(-2) @ gram @ x.unsqueeze(-1)).flatten()
    ok = (x[:, 0] > 0) & (x[:, 1] > 1e-9)
    if not bool(ok.any()):
        return None
    best = int(torch.where(ok, residual, torch.full_like(residual, math.inf)).argmin())
    c, b, vertex = float(x[best, 0]), float(x[best, 1]), float(m[best, 0])
    try:
        return validate_polynomial(2, [c * vertex * vertex + b, -2 * c * vertex, c])
    except ValueError:
        return None


def mass_fitted_coefficients(sample: Sample, degree: int, most: int = 1 << 20) -> tuple[float, ...] | None:
    """A positive polynomial fitted to exp where the attention is: least squares of P(s) e^-s - 1 weighted by
    the exact attention mass on the sampled queries (at most `most` (logit, weight) pairs, a seeded random
    subset), over the union of all ranks' samples. Degree 2: where the unconstrained fit is not positive, the
    best fit of the positive form c (s - m)^2 + b. None where no positive fit exists."""
    s, w = _mass_points(sample, most if degree != 2 else min(most, 1 << 17))
    gram, rhs = _normal_equations(torch.stack([s**j * torch.exp(-s) for j in range(degree + 1)], dim=1), w)
    try:
        return validate_polynomial(degree, [float(c) for c in torch.linalg.solve(gram, rhs).cpu()])
    except (RuntimeError, ValueError):  # singular system, or a fit that is not positive
        pass
    return _positive_quadratic(s, w) if degree == 2 else None


def _head_stats(sample: Sample, out: torch.Tensor, groups: int) -> tuple[list[HeadStats], list[float]]:
    """Per query head: logit std and max, effective number of keys, sampled error; per key/value head: the
    sampled error of its query heads together."""
    rows = sample.rows.squeeze(-1)  # [B, H, m]
    diff2 = ((out - sample.reference) ** 2).sum(-1) * rows
    ref2 = (sample.reference ** 2).sum(-1) * rows
    entropy = -(sample.exact * torch.log(sample.exact.clamp_min(1e-30))).sum(-1)
    stats = []
    for h in range(sample.logits.shape[1]):
        s = sample.logits[:, h][sample.allowed[:, h]]
        used = rows[:, h]
        stats.append(HeadStats(
            head=h, logit_std=float(s.std()) if s.numel() > 1 else 0.0,
            logit_max=float(s.abs().max()) if s.numel() else 0.0,
            effective_keys=float(entropy[:, h][used].exp().mean()) if bool(used.any()) else 0.0,
            sampled_error=finite_or_inf(float(diff2[:, h].sum().sqrt() / ref2[:, h].sum().sqrt().clamp_min(1e-30)))))
    d2, r2 = diff2.sum((0, 2)), ref2.sum((0, 2))
    group_errors = [finite_or_inf(float(d2[g * groups:(g + 1) * groups].sum().sqrt()
                                        / r2[g * groups:(g + 1) * groups].sum().sqrt().clamp_min(1e-30)))
                    for g in range(len(stats) // groups)]
    return stats, group_errors


class CalibrationInputError(ValueError):
    """The example inputs of a site cannot calibrate it (empty, NaN/inf); the message says why."""


def _choose(sample: Sample, degree: int, bound: float) -> tuple[tuple[float, ...], str, float]:
    """(coefficients, fit, sampled error): Taylor, or a fit that measures clearly better (< 0.8x). Every
    number is agreed across ranks, so all ranks pick the same coefficients."""
    candidates = {"Taylor": taylor_coefficients(degree), "range": fitted_coefficients(degree, bound),
                  "mass": mass_fitted_coefficients(sample, degree)}
    names = list(candidates)
    errors = agree([candidate_error(sample, c) if c is not None else math.inf for c in candidates.values()])
    best = min(range(1, len(names)), key=lambda i: errors[i])
    if candidates[names[best]] is not None and errors[best] < 0.8 * errors[0]:
        # bit-identical on every rank even if a solver differs in the last ulp
        return tuple(agree(candidates[names[best]])), names[best], errors[best]
    return tuple(candidates["Taylor"]), "Taylor", errors[0]


def _of_groups(sample: Sample, chosen: Sequence[int], groups: int) -> Sample:
    """The sample of the query heads of these key/value heads (`groups` query heads each)."""
    index = torch.tensor([g * groups + i for g in chosen for i in range(groups)], device=sample.logits.device)
    return Sample(*(t.index_select(1, index) for t in (sample.logits, sample.allowed, sample.bias, sample.rows,
                                                       sample.exact, sample.v, sample.reference)))


class _Fit(NamedTuple):
    """Coefficients chosen on some key/value heads, and what they give on all of them."""

    coefficients: tuple[float, ...]
    fit: str  # "Taylor", "range" or "mass"
    heads: list[HeadStats]  # every query head under these coefficients
    group_errors: list[float]  # every key/value head, agreed across ranks
    bound: float  # B of the heads the coefficients were chosen on, agreed
    sampled_error: float  # the output error on the heads they were chosen on, agreed


def _group_fit(drawn: Sample, degree: int, groups: int, chosen: Sequence[int] | None) -> _Fit:
    """The coefficients chosen on the key/value heads `chosen` (None: all) and the errors of every head under
    them."""
    sub = drawn if chosen is None else _of_groups(drawn, chosen, groups)
    bound = agree([max(float(sub.logits.abs().max()), 1e-6)])[0]  # finite inputs, but float32 may overflow
    coefficients, fit, sampled = _choose(sub, degree, bound)
    heads, group_errors = _head_stats(drawn, polynomial_output(drawn, coefficients), groups)
    return _Fit(coefficients, fit, heads, agree(group_errors), bound, sampled)


def _within(group_errors: Sequence[float], budget: float) -> tuple[int, float]:
    """(key/value heads within budget, minus the sum of their squared errors): the larger the better."""
    fitting = [e for e in group_errors if e <= budget]
    return len(fitting), -sum(e * e for e in fitting)


def _per_head_fit(drawn: Sample, degree: int, budget: float, groups: int,
                  all_heads: _Fit) -> tuple[_Fit, tuple[int, ...] | None]:
    """Coefficients for a site approximated head by head (method="auto"): chosen on the key/value heads it can
    approximate rather than on all of them (a sharp head's logits pull a fit away from what the near-uniform
    heads need).  Candidates: the heads within budget under the all-heads fit, and those plus the next one or
    two nearest to the budget, each fitted on its own sample; the one with the most heads within budget (then
    the smallest error on them) wins, the all-heads fit included.  Returns (fit, the candidate's heads | None)."""
    errors = all_heads.group_errors
    order = sorted(range(len(errors)), key=lambda g: errors[g])
    within = _within(errors, budget)[0]
    best, best_heads = all_heads, None
    if within == len(errors):
        return best, best_heads  # every head fits: the all-heads fit serves them all
    for size in range(max(within, 1), min(within + 2, len(errors) - 1) + 1):
        chosen = tuple(sorted(order[:size]))
        candidate = _group_fit(drawn, degree, groups, chosen)
        if _within(candidate.group_errors, budget) > _within(best.group_errors, budget):
            best, best_heads = candidate, chosen
    return best, best_heads


def calibrate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, degree: int, budget: float,
              causal: bool = False, window: int = 0, sample: int = 128, key_weight: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None, per_head: bool = False) -> Calibration:
    """Logit range and measured error on sampled queries, the polynomial's error bound, the degrees, the
    coefficients, and the approximability of each head.

    q [B, Hq, L, D], k/v [B, Hk, S, D] (GQA groups are repeated here, on the sample only), key_weight
    [B, S] and alibi_slopes [Hq] as the op takes them (the sampled error is that of the masked site).
    ``per_head`` (method="auto", where only the heads within budget are approximated): the coefficients may be
    chosen on a subset of the key/value heads (:func:`_per_head_fit`; ``fit_groups``).  Raises
    CalibrationInputError on inputs it cannot use (see unusable_reason); the budget search checks first.
    """
    reason = unusable_reason(q, k, v)
    if reason is not None:
        raise CalibrationInputError(reason)
    generator = torch.Generator(device="cpu").manual_seed(0)
    index = torch.randperm(q.shape[-2], generator=generator)[:sample].sort().values.to(q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    drawn = sample_attention(q, k, v, scale, causal, window, index, key_weight, alibi_slopes)
    # Under torch.distributed every number that chooses the polynomial is agreed (MAX over ranks), so all
    # ranks fit on the same logit range and pick the same coefficients: no rank runs a different graph.
    all_heads = fitted = _group_fit(drawn, degree, groups, None)
    fit_groups = None
    if per_head:
        fitted, fit_groups = _per_head_fit(drawn, degree, budget, groups, all_heads)
    coefficients, bound = fitted.coefficients, all_heads.bound
    # the error over all heads: the chosen fit's own where it was chosen on all of them
    sampled = all_heads.sampled_error if fit_groups is None else agree([candidate_error(drawn, coefficients)])[0]
    eps = relative_error(coefficients, bound)
    relative = 2 * eps / (1 - eps) if eps < 1 else math.inf
    vmax = float(v.abs().max())
    return Calibration(sampled_error=sampled, logit_bound=bound, eps=eps,
                       predicted_error=relative * vmax if vmax > 0 else 0.0, paper_degree=paper_degree(bound, budget),
                       degree=degree, coefficients=coefficients, fitted=fitted.fit != "Taylor", fit=fitted.fit,
                       heads=fitted.heads, group_errors=fitted.group_errors, fit_groups=fit_groups)


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
