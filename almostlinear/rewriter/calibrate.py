"""Calibration: the logit range of a site on example inputs, the polynomial's error on it, the coefficients.

For one site's captured q/k/v (and its key weight and ALiBi slopes, as the op takes them): B = max |scale q.k|
on sampled queries (the paper's bound), eps = max relative error of P against exp on [-B, B], the error of the
op's output against exact attention on the sampled queries with their keys and masks, the degree the paper's
bound asks for, and Taylor or fitted coefficients (whichever measures better). Every number that chooses
is agreed across ranks (measure.agree), so all ranks fit and decide alike.

Cost (issue 25: planning in seconds): the sample is about PAIRS (batch row, query) pairs per head whatever the
batch (sample_queries); every product that the candidates share is computed once per site (_Drawn: the op's
output for any coefficients from g + 1 products, the error of any set of heads from per-head sums, every
mass-weighted fit from per-head moments); per-head refits skip heads far over the budget. A 6-layer x 12-head
encoder at 16 x 256 calibrates in ~2-4 s instead of 30-100 s on one (busy) thread, decisions alike
(benchmarks/planning.py).
"""
from __future__ import annotations

import dataclasses
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


# The sample: about PAIRS (batch row, query) pairs per query head, at most `sample` queries per batch row and at
# least MIN_QUERIES (the queries of one row share its keys: one product). The per-head errors it gives decide only
# against the budget, and the end-to-end gradient error is measured after them: on a seeded 16 x 256 batch
# (tests/rewriter/test_calibrate.py) they stay within 6% of those of every query of every row near the budget.
# The cost no longer grows with the batch (a 16-row batch was 16 x 128 pairs).
PAIRS = 512
MIN_QUERIES = 16
# Per-head refits (method="auto") leave out a key/value head whose error under the all-heads fit is over FAR x the
# budget: refits on subsets moved a head's error by at most 1.5x on the tests' and the benchmark's sharp heads, so
# none would come within budget, and each refit costs a fit and an evaluation of every head.
FAR = 4.0


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
    near: torch.Tensor | None = None  # bool, broadcastable to logits: the keys the op weights by exp(s) (exact_window)


def sample_queries(batch: int, length: int, sample: int = 128, pairs: int = PAIRS) -> tuple[torch.Tensor | None,
                                                                                               torch.Tensor]:
    """(batch rows, query index) of a calibration sample, the same on every call and every rank.

    A batch of B x min(L, sample) <= pairs pairs is sampled as before: every row (rows None), the same
    min(L, sample) queries (index [m], a seeded random subset, sorted). A larger batch: m = max(MIN_QUERIES,
    pairs // B) queries in each of B' = min(B, pairs // m) rows (rows None: all; else a seeded random subset,
    sorted), index [B', m]: stratified over the positions, pair t = row + B' j at position t L / (B' m) (plus a
    seeded offset per row, below one stratum), so that the rows together cover the sequence evenly (a causal
    site's errors depend on the position: independent random draws missed them by up to 20% where strata
    stay within 6%, measured at 16 x 256)."""
    whole = min(length, sample)
    index = torch.randperm(length, generator=torch.Generator(device="cpu").manual_seed(0))[:whole].sort().values
    m = min(whole, max(MIN_QUERIES, pairs // max(batch, 1)))
    if m == whole:
        return None, index
    kept = min(batch, max(1, pairs // m))
    generator = torch.Generator(device="cpu").manual_seed(1)
    rows = None if kept >= batch else torch.randperm(batch, generator=generator)[:kept].sort().values
    total = kept * m
    t = torch.arange(kept).unsqueeze(1) + kept * torch.arange(m)  # [B', m]
    offset = torch.randint(-(-length // total), (kept, 1), generator=generator)  # below one stratum (ceil(L / total))
    # positions of one row are >= L / m >= 1 apart, and the offset (mod L) keeps them distinct
    return rows, ((t * length) // total + offset).remainder(length).sort(-1).values


def sample_attention(q, k, v, scale: float, causal: bool, window: int, index: torch.Tensor,
                     key_weight: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                     exact_window: int = 0) -> Sample:
    """The Sample of queries `index` (k/v already repeated to q's heads), with the op's mask semantics:
    causal/window, the per-key weight [B, S] and ALiBi slopes [Hq]; ``exact_window`` > 0: the keys the op
    weights exactly. index: [m] (the same queries in every batch row) or [B, m] (each row its own)."""
    B, H, _, D = q.shape
    S = k.shape[-2]
    if index.dim() == 1:
        qs = q.index_select(-2, index).float()
    else:
        qs = q.gather(-2, index.reshape(B, 1, -1, 1).expand(B, H, index.shape[-1], D)).float()
    logits = scale * (qs @ k.float().transpose(-2, -1))  # [B, H, m, S]
    rows_of = (1, 1) if index.dim() == 1 else (B, 1)
    allowed = allowed_keys(index.reshape(-1, 1), S, causal, window).reshape(*rows_of, -1, S).expand_as(logits)
    bias = torch.zeros_like(logits)
    if key_weight is not None:
        kw = key_weight.float().reshape(key_weight.shape[0], 1, 1, S)
        allowed = allowed & (kw > 0)
        bias = bias + torch.log(kw.clamp_min(1e-38))
    if alibi_slopes is not None:
        j = torch.arange(S, device=q.device, dtype=torch.float32)
        i = index.to(torch.float32).reshape(*rows_of, -1, 1)
        bias = bias + alibi_slopes.float().reshape(1, -1, 1, 1) * (j - i)
    rows = allowed.any(-1, keepdim=True)
    allowed = allowed & rows
    bias = bias.masked_fill(~allowed, float("-inf"))
    exact = torch.softmax(torch.where(rows, logits + bias, 0.0), dim=-1) * rows
    vf = v.float()
    near = None
    if exact_window:
        near = allowed_keys(index.reshape(-1, 1), S, causal, exact_window).reshape(*rows_of, -1, S)
    return Sample(logits, allowed, bias, rows, exact, vf, exact @ vf, near)


def _key_factors(sample: Sample) -> torch.Tensor:
    """exp(bias - the row's largest bias) on the allowed keys, 0 elsewhere: what multiplies P(s) in the op."""
    shift = torch.where(sample.rows, sample.bias.amax(-1, keepdim=True), 0.0)
    return torch.exp(sample.bias - shift) * sample.allowed


def _near_weights(sample: Sample, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key factors of the far keys, float64 exact weights exp(s) * key factors of the near keys) with an exact
    window; (factors, zeros) without one."""
    if sample.near is None:
        return factors, torch.zeros_like(factors, dtype=torch.float64)
    near = sample.near.expand_as(factors)
    exact = torch.where(near, torch.exp(sample.logits.double()) * factors.double(), 0.0)
    return factors * ~near, exact


def polynomial_output(sample: Sample, coefficients: Sequence[float]) -> torch.Tensor:
    """The op's output on the sampled queries: weights P(s) * key factors (exp(s) * key factors on the exact
    window's keys), normalised (rows with no allowed key: 0, left out of every error)."""
    far, near = _near_weights(sample, _key_factors(sample))
    weights = evaluate_polynomial(sample.logits, coefficients).double() * far + near
    return ((weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)) @ sample.v.double()).float()


def _ratio(diff2: torch.Tensor | float, ref2: torch.Tensor | float) -> float:
    """sqrt(diff2) / sqrt(ref2), inf where it is not a number."""
    return finite_or_inf(float(torch.as_tensor(diff2).sqrt() / torch.as_tensor(ref2).sqrt().clamp_min(1e-30)))


def candidate_error(sample: Sample | _Heads, coefficients: Sequence[float]) -> float:
    """||A_poly V - A_exp V|| / ||A_exp V|| on the sample (or on some query heads of a drawn sample, from its
    per-head sums); inf where it is not a number (logits that overflow float32 make both sides NaN)."""
    if isinstance(sample, _Heads):
        return sample.drawn.error(coefficients, sample.heads)
    diff = polynomial_output(sample, coefficients) - sample.reference
    return finite_or_inf(float(diff.norm() / sample.reference.norm().clamp_min(1e-30)))


def sampled_output_error(q, k, v, scale: float, coefficients: Sequence[float], causal: bool, window: int,
                         index: torch.Tensor, key_weight: torch.Tensor | None = None,
                         alibi_slopes: torch.Tensor | None = None) -> float:
    """candidate_error of the sampled queries `index` against all their keys (no n x n), with the site's masks."""
    return candidate_error(sample_attention(q, k, v, scale, causal, window, index, key_weight, alibi_slopes),
                           coefficients)


# Mass-weighted fits from moments. With the basis b_j(s) = s^j e^-s and weights w (the exact attention), the
# normal equations of P(s) e^-s ~ 1 are sums over points of w b bᵀ and w b, i.e. of the moments
# A_n = sum w e^-2s s^n and C_n = sum w e^-s s^n; the positive form c (s - m)^2 + b needs A_0..A_4 and C_0..C_2
# for every vertex m (binomial expansion). Moments per query head add up to those of any set of heads, and
# over ranks to those of the union of their samples: one pass over the points serves every fit of a site.
_EXP_LIMIT = 300.0  # a head with a logit beyond this has no mass points (e^-2s would overflow float64)


def _moment_orders(degree: int) -> tuple[int, int]:
    return max(2 * degree, 4) + 1, max(degree, 2) + 1


_CHUNK = 1 << 22  # float64 points per pass (a few 32 MiB temporaries), whatever the sample's size


def _head_slices(sample: Sample) -> list[slice]:
    """Query heads in groups of at most _CHUNK sampled (query, key) pairs (at least one head per group)."""
    B, H, m, S = sample.logits.shape
    step = max(1, _CHUNK // max(B * m * S, 1))
    return [slice(h, min(h + step, H)) for h in range(0, H, step)]


def _moments(sample: Sample, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head [A_0.. | C_0..] of its allowed (logit, exact weight) pairs, float64 [H, K]; per query
    head the largest |logit| of those pairs, 0 for a head left out (a logit beyond _EXP_LIMIT, or none))."""
    na, nc = _moment_orders(degree)
    moments, largest = [], []
    for heads in _head_slices(sample):
        allowed = sample.allowed[:, heads].transpose(0, 1)
        h = allowed.shape[0]
        s = torch.where(allowed, sample.logits[:, heads].transpose(0, 1), 0.0).reshape(h, -1).double()  # [h, N]
        most = s.abs().amax(-1)  # NaN stays NaN: such a head is left out below
        keep = (most <= _EXP_LIMIT).unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        w = sample.exact[:, heads].transpose(0, 1).reshape(h, -1).double() * keep  # 0 on keys not allowed
        decay = torch.exp(-s)
        once = decay * w
        weights = torch.stack([decay.mul_(once), once], dim=1)  # [h, 2, N]: w e^-2s, w e^-s
        power, both = torch.ones_like(s), []
        for n in range(na):
            if n:
                power.mul_(s)
            both.append(torch.bmm(weights, power.unsqueeze(-1)))  # [h, 2, 1]
        both = torch.cat(both, dim=-1)  # [h, 2, na]
        moments.append(torch.cat([both[:, 0], both[:, 1, :nc]], dim=-1))
        largest.append(torch.where(keep.squeeze(-1), most, 0.0))
    return torch.cat(moments), torch.cat(largest)


def _solve_moments(moments: torch.Tensor, degree: int, grid_bound: float) -> tuple[float, ...] | None:
    """The weighted least-squares fit of P(s) e^-s - 1 from the (summed) moments [A_0.. | C_0..]; degree 2:
    where it is not positive, the best positive c (s - m)^2 + b over a grid of vertices in [-grid_bound,
    grid_bound]. None where no positive fit exists."""
    na, _ = _moment_orders(degree)
    a, c = moments[:na], moments[na:]
    n = degree + 1
    gram = torch.stack([a[i:i + n] for i in range(n)])
    try:
        return validate_polynomial(degree, [float(x) for x in torch.linalg.solve(gram, c[:n]).cpu()])
    except (RuntimeError, ValueError):  # singular system, or a fit that is not positive
        pass
    return _positive_quadratic(a, c, grid_bound) if degree == 2 else None


def _positive_quadratic(a: torch.Tensor, c: torch.Tensor, bound: float, centers: int = 65) -> tuple[float, ...] | None:
    """The best P(s) = c (s - m)^2 + b with c > 0, b > 0 (positive for every s) over a grid of vertices m: for
    each m the fit is linear in (c, b); the weighted residual picks m. From the moments A_0..A_4, C_0..C_2."""
    m = torch.linspace(-bound, bound, centers, dtype=torch.float64, device=a.device)
    g11 = a[4] - 4 * m * a[3] + 6 * m**2 * a[2] - 4 * m**3 * a[1] + m**4 * a[0]  # sum w e^-2s (s - m)^4
    g12 = a[2] - 2 * m * a[1] + m**2 * a[0]  # sum w e^-2s (s - m)^2
    gram = torch.stack([torch.stack([g11, g12], -1), torch.stack([g12, a[0].expand_as(m)], -1)], -2)  # [M, 2, 2]
    rhs = torch.stack([c[2] - 2 * m * c[1] + m**2 * c[0], c[0].expand_as(m)], -1)  # [M, 2]
    try:
        x = torch.linalg.solve(gram, rhs)  # [M, 2]
    except RuntimeError:
        return None
    residual = -2 * (x * rhs).sum(-1) + (x.unsqueeze(-2) @ gram @ x.unsqueeze(-1)).flatten()
    ok = (x[:, 0] > 0) & (x[:, 1] > 1e-9) & torch.isfinite(residual)
    if not bool(ok.any()):
        return None
    best = int(torch.where(ok, residual, torch.full_like(residual, math.inf)).argmin())
    scale, floor, vertex = float(x[best, 0]), float(x[best, 1]), float(m[best])
    try:
        return validate_polynomial(2, [scale * vertex * vertex + floor, -2 * scale * vertex, scale])
    except ValueError:
        return None


def mass_fitted_coefficients(sample: Sample, degree: int) -> tuple[float, ...] | None:
    """A positive polynomial fitted to exp where the attention is: least squares of P(s) e^-s - 1 weighted by
    the exact attention mass on the sampled queries (every allowed (logit, weight) pair), over the union of all
    ranks' samples. Degree 2: where the unconstrained fit is not positive, the best fit of the positive form
    c (s - m)^2 + b. None where no positive fit exists."""
    moments, largest = _moments(sample, degree)
    total = summed(moments.sum(0))  # a collective: every rank takes part
    bound = agree([float(largest.max()) if largest.numel() and float(largest.max()) > 0 else 1e-6])[0]
    return _solve_moments(total, degree, bound)


class _Heads(NamedTuple):
    """Some query heads of a drawn sample (a candidate's heads)."""

    drawn: _Drawn
    heads: tuple[int, ...]


class _Drawn:
    """A site's Sample with what every candidate polynomial and every choice of heads shares, computed once.

    The op's output for coefficients c is sum_g c_g T_g / sum_g c_g D_g with T_g = (s^g key factors) @ V and
    D_g = sum of s^g key factors over the keys (float32 products, combined in float64): one evaluation of a
    candidate costs [B, H, m, Dv], not [B, H, m, S]. Per coefficients: the squared error per query head (so the
    error of any set of heads is a sum). Per query head: the logit statistics, the logit bound and the
    mass-fit moments (agreed / summed over ranks once, in this order, on every rank)."""

    def __init__(self, sample: Sample, degree: int, groups: int, fit: bool = True):
        self.sample, self.degree, self.groups, self.fit = sample, degree, groups, fit
        self.heads = sample.logits.shape[1]
        factors, near = _near_weights(sample, _key_factors(sample))
        self.near_num, self.near_den = near @ sample.v.double(), near.sum(-1)  # the exact window's part
        self.powers, self.sums = [], []
        for g in range(degree + 1):
            if g:
                factors = factors * sample.logits
            self.powers.append((factors @ sample.v).double())
            self.sums.append(factors.sum(-1).double())
        self.reference = sample.reference.double()
        self.ref2 = (self.reference ** 2).sum((0, 2, 3))  # [H]
        self._diff2: dict[tuple[float, ...], torch.Tensor] = {}
        self._logit_stats: tuple[list[float], list[float], list[float]] | None = None
        # B: max |scale q.k| over all sampled logits (float32 may overflow: NaN/inf stay)
        # (with an exact window: over the far keys, the only ones the polynomial weights)
        far = sample if sample.near is None else dataclasses.replace(sample, allowed=sample.allowed & ~sample.near)
        bounds = (sample.logits.abs() if sample.near is None
                  else torch.where(far.allowed, sample.logits.abs(), 0.0)).amax((0, 2, 3)).clamp_min(1e-6)
        moments, largest = _moments(far, degree)
        agreed = agree(bounds.tolist() + largest.tolist())  # one collective for both
        self.bounds, self.mass_bounds = agreed[:self.heads], agreed[self.heads:]
        self.moments = summed(moments)  # [H, K], a collective: every rank takes part

    def query_heads(self, chosen: Sequence[int] | None) -> tuple[int, ...]:
        """The query heads of these key/value heads (None: all)."""
        if chosen is None:
            return tuple(range(self.heads))
        return tuple(g * self.groups + i for g in chosen for i in range(self.groups))

    def bound(self, heads: Sequence[int]) -> float:
        values = [self.bounds[h] for h in heads]
        return math.nan if any(math.isnan(b) for b in values) else max(values)

    def diff2(self, coefficients: Sequence[float]) -> torch.Tensor:
        """Per query head: the squared error of the op's output with these coefficients (cached)."""
        key = tuple(float(c) for c in coefficients)
        if key not in self._diff2:
            num = sum(c * t for c, t in zip(key, self.powers)) + self.near_num
            den = sum(c * d for c, d in zip(key, self.sums)) + self.near_den
            out = num / den.clamp_min(1e-30).unsqueeze(-1)
            self._diff2[key] = ((out - self.reference) ** 2).sum((0, 2, 3))
        return self._diff2[key]

    def error(self, coefficients: Sequence[float], heads: Sequence[int]) -> float:
        index = list(heads)
        return _ratio(self.diff2(coefficients)[index].sum(), self.ref2[index].sum())

    def mass_fit(self, heads: Sequence[int]) -> tuple[float, ...] | None:
        """mass_fitted_coefficients on these query heads' sample (their moments, already summed over ranks)."""
        index = list(heads)
        largest = max(self.mass_bounds[h] for h in index)
        return _solve_moments(self.moments[index].sum(0), self.degree, largest if largest > 0 else 1e-6)

    def stats(self, coefficients: Sequence[float]) -> tuple[list[HeadStats], list[float]]:
        """Per query head: logit std and max, effective number of keys, sampled error; per key/value head: the
        sampled error of its query heads together."""
        if self._logit_stats is None:
            self._logit_stats = _logit_stats(self.sample)
        std, largest, effective = self._logit_stats
        d2 = self.diff2(coefficients)
        heads = [HeadStats(head=h, logit_std=std[h], logit_max=largest[h], effective_keys=effective[h],
                           sampled_error=_ratio(d2[h], self.ref2[h])) for h in range(self.heads)]
        groups = [self.error(coefficients, range(g * self.groups, (g + 1) * self.groups))
                  for g in range(self.heads // self.groups)]
        return heads, groups


def _logit_stats(sample: Sample) -> tuple[list[float], list[float], list[float]]:
    """Per query head: the std (unbiased) and max |.| of the logits of the allowed pairs (0 with none, std 0 with
    one) and the mean over the queries with a key of exp(entropy) of the exact attention."""
    std, largest = [], []
    for heads in _head_slices(sample):
        allowed, logits = sample.allowed[:, heads], sample.logits[:, heads]
        count = allowed.sum((0, 2, 3)).double()
        s = torch.where(allowed, logits, 0.0).double()
        mean = s.sum((0, 2, 3)) / count.clamp_min(1)
        centred = torch.where(allowed, s - mean.reshape(1, -1, 1, 1), 0.0)
        std.append(torch.where(count > 1, ((centred ** 2).sum((0, 2, 3)) / (count - 1).clamp_min(1)).sqrt(), 0.0))
        largest.append(torch.where(count > 0, torch.where(allowed, logits.abs(), 0.0).amax((0, 2, 3)).double(), 0.0))
    entropy = -(sample.exact * torch.log(sample.exact.clamp_min(1e-30))).sum(-1)  # [B, H, m]
    used = sample.rows.squeeze(-1)
    queries = used.sum((0, 2))
    effective = torch.where(queries > 0, (entropy.exp() * used).sum((0, 2)) / queries.clamp_min(1), 0.0)
    return torch.cat(std).float().tolist(), torch.cat(largest).float().tolist(), effective.tolist()


class CalibrationInputError(ValueError):
    """The example inputs of a site cannot calibrate it (empty, NaN/inf); the message says why."""


def _choose(sub: _Heads, bound: float) -> tuple[tuple[float, ...], str, float]:
    """(coefficients, fit, sampled error): Taylor, or a fit that measures clearly better (< 0.8x). Every
    number is agreed across ranks, so all ranks pick the same coefficients."""
    degree = sub.drawn.degree
    if not sub.drawn.fit:  # the option coefficients="taylor"
        taylor = taylor_coefficients(degree)
        return tuple(taylor), "Taylor", agree([candidate_error(sub, taylor)])[0]
    candidates = {"Taylor": taylor_coefficients(degree), "range": fitted_coefficients(degree, bound),
                  "mass": sub.drawn.mass_fit(sub.heads)}
    names = list(candidates)
    errors = agree([candidate_error(sub, c) if c is not None else math.inf for c in candidates.values()])
    best = min(range(1, len(names)), key=lambda i: errors[i])
    if candidates[names[best]] is not None and errors[best] < 0.8 * errors[0]:
        # bit-identical on every rank even if a solver differs in the last ulp
        return tuple(agree(candidates[names[best]])), names[best], errors[best]
    return tuple(candidates["Taylor"]), "Taylor", errors[0]


class _Fit(NamedTuple):
    """Coefficients chosen on some key/value heads, and what they give on all of them."""

    coefficients: tuple[float, ...]
    fit: str  # "Taylor", "range" or "mass"
    heads: list[HeadStats]  # every query head under these coefficients
    group_errors: list[float]  # every key/value head, agreed across ranks
    bound: float  # B of the heads the coefficients were chosen on, agreed
    sampled_error: float  # the output error on the heads they were chosen on, agreed


def _group_fit(drawn: _Drawn, chosen: Sequence[int] | None) -> _Fit:
    """The coefficients chosen on the key/value heads `chosen` (None: all) and the errors of every head under
    them."""
    heads = drawn.query_heads(chosen)
    bound = drawn.bound(heads)
    coefficients, fit, sampled = _choose(_Heads(drawn, heads), bound)
    stats, group_errors = drawn.stats(coefficients)
    return _Fit(coefficients, fit, stats, agree(group_errors), bound, sampled)


def _within(group_errors: Sequence[float], budget: float) -> tuple[int, float]:
    """(key/value heads within budget, minus the sum of their squared errors): the larger the better."""
    fitting = [e for e in group_errors if e <= budget]
    return len(fitting), -sum(e * e for e in fitting)


def _per_head_fit(drawn: _Drawn, budget: float, all_heads: _Fit) -> tuple[_Fit, tuple[int, ...] | None]:
    """Coefficients for a site approximated head by head (method="auto"): chosen on the key/value heads it can
    approximate rather than on all of them (a sharp head's logits pull a fit away from what the near-uniform
    heads need).  Candidates: the heads within budget under the all-heads fit, and those plus the next one or
    two nearest to the budget (not those over FAR x the budget), each fitted on its own sample; the one with the
    most heads within budget (then the smallest error on them) wins, the all-heads fit included.  Returns (fit,
    the candidate's heads | None)."""
    errors = all_heads.group_errors
    order = sorted(range(len(errors)), key=lambda g: errors[g])
    within = _within(errors, budget)[0]
    best, best_heads = all_heads, None
    if within == len(errors):
        return best, best_heads  # every head fits: the all-heads fit serves them all
    for size in range(max(within, 1), min(within + 2, len(errors) - 1) + 1):
        if any(errors[g] > FAR * budget for g in order[within:size]):
            break  # the next head is far over budget (agreed errors: every rank stops here)
        chosen = tuple(sorted(order[:size]))
        candidate = _group_fit(drawn, chosen)
        if _within(candidate.group_errors, budget) > _within(best.group_errors, budget):
            best, best_heads = candidate, chosen
    return best, best_heads


def calibrate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, degree: int, budget: float,
              causal: bool = False, window: int = 0, sample: int = 128, key_weight: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None, per_head: bool = False, pairs: int = PAIRS,
              exact_window: int = 0, fit: bool = True) -> Calibration:
    """Logit range and measured error on sampled queries, the polynomial's error bound, the degrees, the
    coefficients, and the approximability of each head.

    q [B, Hq, L, D], k/v [B, Hk, S, D] (GQA groups are repeated here, on the sample only), key_weight
    [B, S] and alibi_slopes [Hq] as the op takes them (the sampled error is that of the masked site). The
    sample: about `pairs` (batch row, query) pairs, at most `sample` queries per row (:func:`sample_queries`).
    ``per_head`` (method="auto", where only the heads within budget are approximated): the coefficients may be
    chosen on a subset of the key/value heads (:func:`_per_head_fit`; ``fit_groups``).  Raises
    CalibrationInputError on inputs it cannot use (see unusable_reason); the budget search checks first.
    ``exact_window`` > 0: the op keeps exact weights on each query's nearest keys (kernels/exact_window.py): the
    errors are those of that op, and B and the fits cover the other (far) keys only.  ``fit`` False (the option
    coefficients="taylor"): Taylor coefficients, never a fit.
    """
    reason = unusable_reason(q, k, v)
    if reason is not None:
        raise CalibrationInputError(reason)
    vmax = float(v.abs().max())
    rows, index = sample_queries(q.shape[0], q.shape[-2], sample, pairs)
    index = index.to(q.device)
    if rows is not None:
        rows = rows.to(q.device)
        q, k, v = (t.index_select(0, rows) for t in (q, k, v))
        if key_weight is not None and key_weight.shape[0] > 1:
            key_weight = key_weight.index_select(0, rows)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # Under torch.distributed every number that chooses the polynomial is agreed (MAX over ranks, the fits'
    # moments summed), so all ranks fit on the same logit range and pick the same coefficients: no rank runs a
    # different graph.
    drawn = _Drawn(sample_attention(q, k, v, scale, causal, window, index, key_weight, alibi_slopes, exact_window),
                   degree, groups, fit)
    all_heads = fitted = _group_fit(drawn, None)
    fit_groups = None
    if per_head:
        fitted, fit_groups = _per_head_fit(drawn, budget, all_heads)
    coefficients, bound = fitted.coefficients, all_heads.bound
    # the error over all heads: the chosen fit's own where it was chosen on all of them
    sampled = (all_heads.sampled_error if fit_groups is None
               else agree([candidate_error(_Heads(drawn, drawn.query_heads(None)), coefficients)])[0])
    eps = relative_error(coefficients, bound)
    relative = 2 * eps / (1 - eps) if eps < 1 else math.inf
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
