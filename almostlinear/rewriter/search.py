"""The budget search: calibrate, predict, rewrite, measure, back off until the error fits.

1. Apply the all-exact reference to the prepared graph and run it once (fwd+bwd); it also captures q/k/v and
   the key-mask values of the candidate sites.
2. Calibrate each candidate on them (calibrate.py: logit bound B, polynomial error eps, sampled output error,
   the paper's degree vs the chosen one, Taylor or fitted coefficients). method="auto": sites whose sampled
   error exceeds the budget stay exact without being tried.
3. Apply the decisions, measure the end-to-end gradient error against the reference (measure.py).
4. While it exceeds the budget (method="auto"), the site with the largest measured error goes back to exact;
   apply and measure again. method="polynomial" (train with polynomial attention) has no gate: every supported
   site stays approximated and the measured distance to softmax is recorded as information, without a warning. Every step is recorded in report.history. Cost: one reference pass plus one pass
   per step (fwd+bwd), all on the graph prepared once (pipeline.apply).

Inputs that cannot calibrate or measure (an empty batch, NaN/inf in a site's q/k/v, or exact gradients that
are not finite) never fail the compile: under method="auto" the sites concerned stay exact, with the reason
in their report row; under method="polynomial" they are approximated with Taylor coefficients (nothing to
fit on), with the reason noted.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..kinds import Choice, Method
from .calibrate import Calibration, alibi_value, calibrate, key_weight_value, site_scale
from .guard import describe as describe_guard, limits, logit_bounds
from .holdout import IN_SAMPLE, BatchSplit, batch_split
from .measure import Measurement, agree, gradient_error, real_inputs, run_with_grads, unusable_reason
from .options import Options
from .pipeline import Applied, Prepared, apply
from .policy import Decision
from .report import Report, log
from .subbatch import Sample, sub_batch_sample


class BudgetError(RuntimeError):
    """strict=True and the budget cannot be met with the approximation."""


@dataclass
class _Search:
    """The state of one search: the decisions so far and what was measured."""

    prepared: Prepared
    options: Options
    decisions: dict[int, Decision]
    candidates: list[int]
    calibrations: dict[int, Calibration] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # site id -> why it went back to exact
    unmeasurable: bool = False  # the exact gradients are not finite on these inputs
    reference_sites: list = field(default_factory=list)  # the sites as rewritten in the reference graph
    reference_graph: Any = None  # the all-exact graph module

    def exact(self, sid: int, why: str) -> None:
        self.decisions[sid] = Decision(Method.EXACT, why)
        self.dropped[sid] = why


def search_within_budget(prepared: Prepared, decisions: dict[int, Decision], options: Options,
                         example_inputs: Sequence[Any], report: Report) -> Applied:
    """The decisions after calibration and back-off, applied (the report's history records every step)."""
    started = time.perf_counter()
    candidates = sorted(sid for sid, d in decisions.items() if d.method is Method.POLYNOMIAL)
    search = _Search(prepared, options, dict(decisions), candidates)
    inputs = real_inputs(example_inputs)
    if inputs is None:
        for sid in candidates:
            search.decisions[sid] = Decision(Method.EXACT, "fused exact: no real example inputs to measure the error on")
        return apply(prepared, search.decisions, options)
    rng = torch.get_rng_state()
    split, why = batch_split(prepared.graph_module, inputs)
    reference, sample = _samples(search, split, inputs, rng)
    report.grad_error_covers = sample.describe or IN_SAMPLE.format(why=why)
    _calibrate_all(search, reference, sample.reference, split)
    current, error, local = _back_off(search, sample, rng, report)
    _annotate(current, search, local)
    # all exact on inputs whose exact gradients are not finite: nothing was measured
    report.grad_error = None if search.unmeasurable and not current.op_nodes else error
    report.history[-1]["planning_seconds"] = time.perf_counter() - started
    _raise_if_strict(search, current)
    return current


def _samples(search: _Search, split: BatchSplit | None, inputs: list,
             rng: torch.Tensor) -> tuple[Measurement, Sample]:
    """The exact reference run (capturing what calibration needs) and where the error is measured (holdout.py):
    on a few held-out rows as a batch of their own where the graph allows it (subbatch.py: the capture is then a
    forward only), else on the held-out rows at the example's batch, else in-sample."""
    options = search.options
    if split is None:
        reference = _reference(search, inputs, rng)
        return reference, Sample(inputs, reference)
    few = options.measure_rows is not None and not options.context_parallel
    repeat = split.mode == "repeat"
    rows = split.cotangent_rows()  # (rows mode: the held-out rows; repeat: None)
    reference = _reference(search, inputs, rng, backward=not (few or repeat), rows=rows)

    def whole_batch(why_not: str = "") -> Sample:
        if why_not:
            log.info("almostlinear: planning measures on the whole batch: %s", why_not)
        if repeat:  # an output mixes the rows: the held-out rows repeated to the example's batch
            held_out = split.held_out_inputs(inputs)
            return Sample(held_out, run_with_grads(search.reference_graph, held_out, rng),
                          describe=split.describe(why_all=why_not))
        full = reference if not few else run_with_grads(search.reference_graph, inputs, rng, rows=rows)
        return Sample(inputs, full, rows, describe=split.describe(why_all=why_not))

    if not few:
        return reference, whole_batch()
    sample, why_not = sub_batch_sample(search.reference_graph, split, inputs, reference, rng, options.measure_rows)
    if sample is None:
        return reference, whole_batch(why_not)
    sample.fallback = whole_batch
    return reference, sample


def _reference(search: _Search, inputs: list, rng: torch.Tensor, backward: bool = True,
               rows: torch.Tensor | None = None) -> Measurement:
    """One fwd(+bwd) of the all-exact graph, capturing the candidates' q/k/v and key-mask values (the gradients
    only when the error is measured on these inputs: `backward`; of these batch rows' outputs: `rows`)."""
    exact = {sid: Decision(Method.EXACT, "reference") if d.method is Method.POLYNOMIAL else d
             for sid, d in search.decisions.items()}
    applied = apply(search.prepared, exact, search.options)
    watch = {}
    for site in applied.sites:
        if site.id in search.candidates:
            k, v = site.op_kv
            watch.update({site.q: site.id, k: site.id, v: site.id})
            watch.update({term.node: site.id for term in site.mask.key_mask})  # the key mask's values
    search.reference_sites, search.reference_graph = applied.sites, applied.graph_module
    return run_with_grads(applied.graph_module, inputs, rng, watch, backward=backward, rows=rows)


def _captured(site, reference: Measurement):
    k, v = site.op_kv
    return reference.captured.get(site.q), reference.captured.get(k), reference.captured.get(v)


def _calibrate_all(search: _Search, reference: Measurement, measuring: Measurement, split: BatchSplit | None) -> None:
    """Calibrate every usable candidate on the captured values (their `split.fit` rows); under method="auto" drop
    those whose sampled error is over budget. `measuring`: the exact gradients the error will be measured
    against (the held-out rows'), whose finiteness decides whether anything can be measured."""
    options = search.options
    fit = split.fit_rows if split is not None else (lambda x: x)
    unusable, empty = _unusable_sites(search.reference_sites, reference, search.candidates)
    search.unmeasurable = bool(agree([0.0 if reference.finite() and measuring.finite() else 1.0])[0])
    if search.unmeasurable and options.method is not Choice.POLYNOMIAL:
        # NaN/inf reached the exact gradients (from any input, not necessarily a site's): no gradient error
        # can be measured on these inputs, so nothing can be shown to fit the budget
        for sid in search.candidates:
            unusable.setdefault(sid, "the exact gradients contain NaN/inf on these inputs (the end-to-end "
                                     "error cannot be measured)")
    for sid, reason in unusable.items():
        _keep_uncalibrated(search, sid, reason, sid in empty)
    bounds: dict[int, list[float]] = {}  # per site, per key/value head: the example batch's logit bound
    for site in search.reference_sites:
        if site.id not in search.candidates or site.id in unusable:
            continue
        q, k, v = _captured(site, reference)
        if q is None or k is None or v is None or q.dim() != 4:
            continue
        d = search.decisions[site.id]
        run = functools.partial(
            calibrate, fit(q), fit(k), fit(v), site_scale(site), d.degree or 2, options.budget,
            causal=site.mask.causal, window=site.mask.window,
            key_weight=fit(key_weight_value(site, reference.captured, q)), alibi_slopes=alibi_value(site, q),
            per_head=options.method is Choice.AUTO, fit=options.coefficients == "fit")
        search.calibrations[site.id] = run(exact_window=d.exact_window)
        if d.exact_window and options.method is Choice.AUTO:
            search.decisions[site.id] = _window_or_not(search.calibrations, site.id, d, run(), options.budget)
        bounds[site.id] = logit_bounds(q, k, site_scale(site))
    ids = sorted(search.calibrations)
    for sid, agreed in zip(ids, agree([search.calibrations[sid].sampled_error for sid in ids])):
        cal = search.calibrations[sid]
        cal.sampled_error = agreed  # the worst rank's number: every rank decides the same
        cal.group_errors = agree(cal.group_errors)  # (and so are the heads it approximates)
        fits = [g for g, e in enumerate(cal.group_errors) if e <= options.budget]
        if options.method is Choice.AUTO and not fits:
            search.exact(sid, f"fused exact: error on sampled queries {cal.sampled_error:.3g} > budget "
                              f"{options.budget:g} (logits up to B = {cal.logit_bound:.3g}, eps = {cal.eps:.3g}; "
                              f"the bound needs degree {cal.paper_degree})")
            continue
        d = search.decisions[sid]
        heads, reason = None, d.reason
        if options.method is Choice.AUTO and len(fits) < len(cal.group_errors):
            heads = tuple(fits)  # per-head decision: the heads whose sampled error fits the budget
            reason = (f"{d.reason}; per head: {len(fits)} of {len(cal.group_errors)} key/value heads within budget "
                      f"on sampled queries (errors {', '.join(f'{e:.3g}' for e in cal.group_errors)})")
        if cal.fit_groups is not None:
            reason += f"; {cal.fit} coefficients chosen on key/value heads {list(cal.fit_groups)}"
        guard = None
        # batches sharper than this one run exact (guard.py); not under context parallelism, where a head's mode must
        # be the same on every rank of a sequence and the guard decides from this rank's shard
        if options.method is Choice.AUTO and options.guard and not options.context_parallel:
            guard = limits(agree(bounds[sid]), cal.group_errors, options.budget)
            reason += f"; {describe_guard(guard)}"
        search.decisions[sid] = Decision(Method.POLYNOMIAL, reason, d.degree or 2,
                                         cal.coefficients if cal.fitted else None, d.min_seq_len, heads, guard,
                                         d.exact_window)


def _within_budget(cal, budget: float) -> int:
    """How many key/value heads are within the budget on the sampled queries."""
    return sum(e <= budget for e in cal.group_errors)


def _window_or_not(calibrations: dict, sid: int, d: Decision, plain, budget: float) -> Decision:
    """method="auto" with an exact window: the step between the polynomial alone and exact attention.  The
    window (exact softmax on each query's nearest keys, at some extra cost: benchmarks/attention.py) is kept where
    it brings more key/value heads within the budget than the polynomial alone; otherwise the site runs the
    polynomial alone.  Both sampled errors are in the reason."""
    windowed = calibrations[sid]
    errors = ("per key/value head without / with the window: "
              + ", ".join(f"{a:.3g} / {b:.3g}" for a, b in zip(plain.group_errors, windowed.group_errors)))
    if _within_budget(windowed, budget) > _within_budget(plain, budget):
        return dataclasses.replace(d, reason=f"{d.reason} ({errors})")
    calibrations[sid] = plain
    return dataclasses.replace(d, exact_window=0, reason=f"{d.reason}; no exact window: it brings no head within "
                                                         f"budget ({errors})")


def _keep_uncalibrated(search: _Search, sid: int, reason: str, empty: bool) -> None:
    d = search.decisions[sid]
    if empty:
        # Dynamo specializes sizes 0 and 1, so this graph serves empty batches only: nothing to speed up
        search.decisions[sid] = Decision(Method.EXACT, f"kept exact: {reason}, nothing to approximate")
    elif search.options.method is Choice.POLYNOMIAL:
        search.decisions[sid] = Decision(Method.POLYNOMIAL, f"{d.reason}; not calibrated ({reason}): Taylor "
                                                            f"coefficients", d.degree or 2, None, d.min_seq_len,
                                                            exact_window=d.exact_window)
    else:
        search.decisions[sid] = Decision(Method.EXACT, f"kept exact: {reason}")


def _back_off(search: _Search, sample: Sample, rng: torch.Tensor, report: Report):
    """Apply and measure; under method="auto", while over budget, the worst site goes back to exact."""
    options, step = search.options, 0
    reference = sample.reference
    while True:
        current = apply(search.prepared, search.decisions, options)
        try:
            measured = sample.measure(current.graph_module, rng)
        except Exception as exc:  # noqa: BLE001 - a rewritten graph that does not run resized (subbatch.py)
            if sample.fallback is None:
                raise
            sample = sample.fallback(f"a rewritten graph does not run on fewer rows ({type(exc).__name__}: {exc})")
            report.grad_error_covers, reference = sample.describe, sample.reference
            measured = sample.measure(current.graph_module, rng)
        ids = sorted(current.op_nodes)
        # context parallelism measures no local error (its exact reference needs every rank's keys): the sites are
        # ordered by their calibration's sampled error instead
        unmeasured = search.calibrations if options.context_parallel else {}
        agreed = agree([gradient_error(measured.grads, reference.grads)]
                       + [measured.local_errors.get(current.op_nodes[sid],
                                                    getattr(unmeasured.get(sid), "sampled_error", math.inf))
                          for sid in ids])
        error, local = agreed[0], dict(zip(ids, agreed[1:]))
        if search.unmeasurable:
            error = math.nan  # the exact gradients are not finite: no error to measure against them
        elif not math.isfinite(error) and ids:
            _not_finite(search, report, ids, error)
            if options.method is Choice.AUTO:  # no site can be blamed for a NaN: every one goes back to exact
                step += 1
                continue
        report.history.append({"call": 0, "step": step, "grad_error": error, "approximated": ids,
                               "site_errors": local, "heads": {sid: search.decisions[sid].heads for sid in ids
                                                               if search.decisions[sid].heads is not None}})
        log.info("%s: step %d, end-to-end gradient error %.3g with sites %s approximated",
                 report.graph_name, step, error, ids)
        if error <= options.budget or not ids or options.method is Choice.POLYNOMIAL:
            return current, error, local
        _back_off_worst(search, current, measured, local, error)
        step += 1


def _not_finite(search: _Search, report: Report, ids: list[int], error: float) -> None:
    """The approximated graph's gradients are not finite where the exact ones are: a warning (in the report and
    through `warnings`); under method="auto" every approximated site goes back to exact."""
    auto = search.options.method is Choice.AUTO
    message = (f"{report.graph_name}: with sites {ids} approximated the end-to-end gradient error is {error} on the "
               f"example inputs (the exact gradients are finite): " +
               ("those sites are kept exact" if auto else "method='polynomial' keeps them approximated; the model's "
                                                           "gradients are not finite on such inputs"))
    report.warnings.append(message)
    warnings.warn(f"almostlinear: {message}", RuntimeWarning, stacklevel=2)
    if auto:
        for sid in ids:
            search.exact(sid, f"fused exact: the gradients were not finite ({error}) with this site approximated")


def _back_off_worst(search: _Search, current: Applied, measured: Measurement, local: dict[int, float],
                    error: float) -> None:
    """The site with the largest measured error goes back to exact; a site whose heads are decided one by one
    first gives up its worst approximated head (GQA: key/value head)."""
    budget = search.options.budget
    worst = max(local, key=lambda sid: _order(local[sid]))
    decision = search.decisions[worst]
    per_head = measured.head_errors.get(current.op_nodes[worst], [])
    heads = list(decision.heads) if decision.heads is not None else list(range(len(per_head)))
    if len(heads) > 1 and per_head:
        head = max(heads, key=lambda h: _order(per_head[h]))
        heads.remove(head)
        search.decisions[worst] = dataclasses.replace(
            decision, heads=tuple(heads),
            reason=f"{decision.reason}; key/value head {head} back to exact (budget {budget:g} exceeded, "
                   f"{error:.3g} end-to-end; its measured error {per_head[head]:.3g})")
        return
    search.exact(worst, f"fused exact: budget {budget:g} exceeded ({error:.3g} end-to-end) and this site "
                        f"had the largest measured error ({local[worst]:.3g})")


def _annotate(current: Applied, search: _Search, local: dict[int, float]) -> None:
    for row in current.rows:
        cal = search.calibrations.get(row.id)
        if cal is not None:
            row.sampled_error, row.logit_bound, row.eps = cal.sampled_error, cal.logit_bound, cal.eps
            row.predicted_error, row.paper_degree = cal.predicted_error, cal.paper_degree
            on = set(row.approximated_heads) if row.approximated_heads is not None else None
            row.heads = [dict(dataclasses.asdict(h), approximated=row.method == Method.POLYNOMIAL and
                              (on is None or h.head in on)) for h in cal.heads]
        if row.id in current.op_nodes and not row.context_parallel:  # (context parallel: no local exact reference)
            value = local.get(row.id)
            row.measured_error = None if value is None or math.isnan(value) else value


def _raise_if_strict(search: _Search, current: Applied) -> None:
    """strict=True: a site that had to go back to exact fails the compile, naming each site and why."""
    options = search.options
    if options.strict and search.dropped:
        paths = {row.id: row.module_path or "(root)" for row in current.rows}
        lines = [f"  site {sid} ({paths.get(sid, '?')}): {why}" for sid, why in sorted(search.dropped.items())]
        raise BudgetError(
            f"almostlinear (strict=True): the budget {options.budget:g} cannot be met with the approximation at "
            f"{len(search.dropped)} site(s):\n" + "\n".join(lines)
        )


def _unusable_sites(sites: list, reference: Measurement, candidates: list[int]) -> tuple[dict[int, str], set[int]]:
    """{site id: why its captured q/k/v cannot calibrate it} and the ids whose batch is empty.

    Agreed across ranks like every other number that decides (0 usable, 1 NaN/inf, 2 empty; the maximum
    wins), so that every rank rewrites the same sites the same way.
    """
    local: dict[int, str] = {}
    codes = {sid: 0.0 for sid in candidates}
    for site in sites:
        q, k, v = _captured(site, reference)
        if site.id not in codes or q is None or k is None or v is None:
            continue
        reason = unusable_reason(q, k, v)
        if reason is not None:
            local[site.id] = reason
            codes[site.id] = 2.0 if any(x.numel() == 0 for x in (q, k, v)) else 1.0
    unusable, empty = {}, set()
    for sid, code in zip(candidates, agree([codes[sid] for sid in candidates])):
        if code >= 2.0:
            empty.add(sid)
            unusable[sid] = local[sid] if codes[sid] >= 2.0 else "empty batch (on another rank)"
        elif code >= 1.0:
            unusable[sid] = local[sid] if codes[sid] >= 1.0 else "calibration inputs contain NaN/inf (on another rank)"
    return unusable, empty


def _order(error: float | None) -> float:
    """A measured error as a sort key: not measured ranks lowest, NaN (not a number) as unbounded."""
    if error is None:
        return -1.0
    return math.inf if math.isnan(error) else error


__all__ = ["search_within_budget", "BudgetError"]
