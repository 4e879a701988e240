"""Planning within the budget: calibrate, predict, rewrite, measure, back off until the error fits.

1. Calibrate each approximated site on the example inputs (logit bound B, polynomial error eps, predicted
   output error, the paper's degree vs the chosen one, Taylor or fitted coefficients).
2. method="auto": sites predicted not to fit the budget stay exact without being tried.
3. Rewrite the rest, measure the end-to-end gradient error against the all-exact reference.
4. While it exceeds the budget, the site with the largest measured error goes back to exact; measure again.
Every step is recorded in report.history. Cost: one reference pass plus one pass per step (fwd+bwd).

Inputs that cannot calibrate or measure (an empty batch, NaN/inf in a site's q/k/v, or exact gradients that
are not finite) never fail the compile: under method="auto" the sites concerned stay exact, with the reason
in their report row; under method="polynomial" they are approximated with Taylor coefficients (nothing to
fit on), with the reason noted.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from ..passes.graph_utils import example_value, is_number
from .budget import (BudgetError, Calibration, agree, calibrate, gradient_error, real_inputs, run_with_grads,
                     unusable_reason)
from .options import Options
from .approximate import MIN_LEN_PREFIX, alibi_value, key_weight_value
from .plan import Decision
from .report import Report, log


@contextlib.contextmanager
def length_gates_open(work) -> Iterator[None]:
    """Sites of a dynamic length run the op only from min_seq_len on (a buffer per site, see approximate._switch);
    while planning measures, every gate is open, so the approximation is measured even on an example that is
    shorter than the crossover."""
    gates = {name: buf.clone() for name, buf in work.named_buffers() if name.startswith(MIN_LEN_PREFIX)}
    try:
        for name in gates:
            work.get_buffer(name).fill_(0)
        yield
    finally:
        for name, value in gates.items():
            work.get_buffer(name).copy_(value)


def _site_scale(site) -> float:
    """The factor on q.k of the captured q (pre-scaled q already holds its own factor)."""
    if site.form == "sdpa":
        return float(site.scale) if is_number(site.scale) else 1.0
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


def _annotate(row, calibration: Calibration) -> None:
    row.sampled_error = calibration.sampled_error
    row.logit_bound = calibration.logit_bound
    row.eps = calibration.eps
    row.predicted_error = calibration.predicted_error
    row.paper_degree = calibration.paper_degree


def plan_within_budget(gm, example_inputs: Sequence[Any], options: Options, initial, build: Callable,
                       report: Report):
    started = time.perf_counter()
    decisions: dict[int, Decision] = dict(initial.decisions)
    candidates = sorted(initial.poly_nodes)
    inputs = real_inputs(example_inputs)
    if inputs is None:
        for sid in candidates:
            decisions[sid] = Decision("exact", "fused exact: no real example inputs to measure the error on")
        return build(gm, example_inputs, options, decisions)

    # Reference: every site exact. One pass; it also captures q/k/v of the candidate sites.
    exact = {sid: Decision("exact", "reference") if d.method == "polynomial" else d for sid, d in decisions.items()}
    reference = build(gm, example_inputs, options, exact)
    watch = {}
    for site in reference.sites:
        if site.id in candidates:
            k, v = site.op_kv
            watch.update({site.q: site.id, k: site.id, v: site.id})
            watch.update({term.node: site.id for term in site.mask.key_mask})  # the key mask's values
    rng = torch.get_rng_state()
    ref = run_with_grads(reference.work, inputs, rng, watch)

    calibrations: dict[int, Calibration] = {}
    dropped: dict[int, str] = {}
    unusable, empty = _unusable_sites(reference.sites, candidates, ref)
    unmeasurable = bool(agree([0.0 if ref.finite() else 1.0])[0])
    if unmeasurable and options.method != "polynomial":
        # NaN/inf reached the exact gradients (from any input, not necessarily a site's): no gradient error
        # can be measured on these inputs, so nothing can be shown to fit the budget
        for sid in candidates:
            unusable.setdefault(sid, "the exact gradients contain NaN/inf on these inputs (the end-to-end "
                                     "error cannot be measured)")
    for sid, reason in unusable.items():
        d = decisions[sid]
        if sid in empty:
            # Dynamo specializes sizes 0 and 1, so this graph serves empty batches only: nothing to speed up
            decisions[sid] = Decision("exact", f"kept exact: {reason}, nothing to approximate")
        elif options.method == "polynomial":
            decisions[sid] = Decision("polynomial", f"{d.reason}; not calibrated ({reason}): Taylor coefficients",
                                      d.degree or 2, None)
        else:
            decisions[sid] = Decision("exact", f"kept exact: {reason}")
    for site in reference.sites:
        if site.id not in candidates or site.id in unusable:
            continue
        k, v = site.op_kv
        q_val, k_val, v_val = ref.captured.get(site.q), ref.captured.get(k), ref.captured.get(v)
        if q_val is None or k_val is None or v_val is None or q_val.dim() != 4:
            continue
        degree = decisions[site.id].degree or 2
        calibrations[site.id] = calibrate(q_val, k_val, v_val, _site_scale(site), degree, options.budget,
                                          causal=site.mask.causal, window=site.mask.window,
                                          key_weight=key_weight_value(site, ref.captured, q_val),
                                          alibi_slopes=alibi_value(site, q_val))
    ids = sorted(calibrations)
    for sid, agreed in zip(ids, agree([calibrations[sid].sampled_error for sid in ids])):
        cal = calibrations[sid]
        cal.sampled_error = agreed  # the worst rank's number: every rank decides the same
        if options.method == "auto" and cal.sampled_error > options.budget:
            why = (f"fused exact: error on sampled queries {cal.sampled_error:.3g} > budget {options.budget:g} "
                   f"(logits up to B = {cal.logit_bound:.3g}, eps = {cal.eps:.3g}; the bound needs degree "
                   f"{cal.paper_degree})")
            decisions[sid] = Decision("exact", why)
            dropped[sid] = why
        else:
            d = decisions[sid]
            decisions[sid] = Decision("polynomial", d.reason, d.degree or 2, cal.coefficients if cal.fitted else None)

    step = 0
    while True:
        current = build(gm, example_inputs, options, decisions)
        with length_gates_open(current.work):
            measured = run_with_grads(current.work, inputs, rng)
        ids = sorted(current.poly_nodes)
        agreed = agree([gradient_error(measured.grads, ref.grads)]
                       + [measured.local_errors.get(current.poly_nodes[sid], math.inf) for sid in ids])
        error, local = agreed[0], dict(zip(ids, agreed[1:]))
        if unmeasurable:
            error = math.nan  # the exact gradients are not finite: no error to measure against them
        report.history.append({"call": 0, "step": step, "grad_error": error,
                               "approximated": sorted(current.poly_nodes), "site_errors": local})
        log.info("%s: step %d, end-to-end gradient error %.3g with sites %s approximated",
                 report.graph_name, step, error, sorted(current.poly_nodes))
        if error <= options.budget or not current.poly_nodes or options.method == "polynomial":
            break
        worst = max(local, key=lambda sid: _order(local[sid]))
        why = (f"fused exact: budget {options.budget:g} exceeded ({error:.3g} end-to-end) and this site had the "
               f"largest measured error ({local[worst]:.3g})")
        decisions[worst] = Decision("exact", why)
        dropped[worst] = why
        step += 1

    for row in current.rows:
        if row.id in calibrations:
            _annotate(row, calibrations[row.id])
        if row.id in current.poly_nodes:
            value = local.get(row.id)
            row.measured_error = None if value is None or math.isnan(value) else value
    # all exact on inputs whose exact gradients are not finite: nothing was measured
    report.grad_error = None if unmeasurable and not current.poly_nodes else error
    report.history[-1]["planning_seconds"] = time.perf_counter() - started

    if options.method == "polynomial" and current.poly_nodes and math.isnan(error):
        warnings.warn(
            f"almostlinear: method='polynomial' approximates every supported site, but the end-to-end gradient "
            f"error could not be measured on the example inputs (the exact gradients contain NaN/inf) "
            f"({report.graph_name})",
            stacklevel=2,
        )
    if options.method == "polynomial" and error > options.budget:
        warnings.warn(
            f"almostlinear: method='polynomial' approximates every supported site, and the measured end-to-end "
            f"gradient error {error:.3g} exceeds the budget {options.budget:g} ({report.graph_name})",
            stacklevel=2,
        )
    if options.strict and dropped:
        lines = [f"  site {sid} ({_path(current, sid)}): {why}" for sid, why in sorted(dropped.items())]
        raise BudgetError(
            f"almostlinear (strict=True): the budget {options.budget:g} cannot be met with the approximation at "
            f"{len(dropped)} site(s):\n" + "\n".join(lines)
        )
    return current


def _unusable_sites(sites, candidates: list[int], ref) -> tuple[dict[int, str], set[int]]:
    """{site id: why its captured q/k/v cannot calibrate it} and the ids whose batch is empty.

    Agreed across ranks like every other number that decides (0 usable, 1 NaN/inf, 2 empty; the maximum
    wins), so that every rank rewrites the same sites the same way.
    """
    local: dict[int, str] = {}
    codes = {sid: 0.0 for sid in candidates}
    for site in sites:
        if site.id not in codes:
            continue
        k, v = site.op_kv
        q_val, k_val, v_val = ref.captured.get(site.q), ref.captured.get(k), ref.captured.get(v)
        if q_val is None or k_val is None or v_val is None:
            continue
        reason = unusable_reason(q_val, k_val, v_val)
        if reason is not None:
            local[site.id] = reason
            codes[site.id] = 2.0 if any(x.numel() == 0 for x in (q_val, k_val, v_val)) else 1.0
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


def _path(result, sid: int) -> str:
    for row in result.rows:
        if row.id == sid:
            return row.module_path or "(root)"
    return "?"


__all__ = ["plan_within_budget", "BudgetError"]
