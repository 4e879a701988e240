"""What the backend found and did: `Site` rows (built from matched sites), the `Report` table, logging and
the tlparse artifact."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..kernels import feature_rank
from ..kinds import Method
from ..passes.graph_utils import concrete_int, shape_of
from ..passes.rewrite import dropout_probability

log = logging.getLogger("almostlinear")


@dataclass
class Site:
    """One attention site (or near-miss softmax) of a compiled graph, and the decision taken for it."""

    id: int
    module_path: str
    source_line: str
    form: str  # "eager" chain, "sdpa" call, or "softmax" for a near-miss
    q_shape: tuple | None = None
    k_shape: tuple | None = None
    v_shape: tuple | None = None
    mask_kind: str = "none"
    causal: bool = False
    window: int = 0
    scale: float | None = None
    dropout_p: float | None = 0.0
    gqa_groups: int = 1
    residual: str | None = None
    rewritten: bool = False
    method: Method = Method.EXACT
    degree: int | None = None
    rank: int | None = None
    reason: str = ""
    predicted_error: float | None = None  # 2 eps / (1 - eps) * max|V| on the example inputs
    measured_error: float | None = None  # relative output error of the op vs exact attention, measured
    sampled_error: float | None = None  # the same on sampled queries at calibration (decides what is tried)
    logit_bound: float | None = None  # B: max |scale q.k| seen on the example inputs
    eps: float | None = None  # relative error of the polynomial on [-B, B]
    paper_degree: int | None = None  # the Taylor degree the error bound would need for the budget
    coefficients: tuple | None = None
    region: str = ""  # the higher-order op body the site is in, e.g. "checkpoint wrap_body_0, use_reentrant=False"
    exact_window: int = 0  # exact softmax on each query's nearest keys (the op with an exact window); 0: none
    approximated_heads: list | None = None  # query heads the op computes when not all of them (per-head decisions)
    context_parallel: str = ""  # under context parallelism: how the site reaches the other ranks' keys
    sent_bytes: int | None = None  # ... and the bytes this rank sends per call (its share of the all-gathers)
    heads: list = field(default_factory=list)  # the approximability map: one dict per query head (calibrate.HeadStats)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    """Everything one backend call decided, for one captured graph."""

    graph_name: str
    options: dict
    sites: list[Site] = field(default_factory=list)
    near_misses: list[Site] = field(default_factory=list)
    grad_error: float | None = None
    grad_error_call: int = 0  # the training call grad_error was measured at (0: at compile; later: a re-check)
    grad_error_covers: str = ""  # what the planning figure was measured on (held-out rows, or in-sample and why)
    budget: float = 0.05
    graph_before: str = ""
    graph_after: str = ""
    planning_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    ddp_pieces: int | None = None  # graphs the DDP backend split the rewritten graph into (None: not split)
    context_parallel: dict | None = None  # {"ranks": W, "rank": r} when the sequence is split over a group
    warnings: list[str] = field(default_factory=list)  # what the user must know (also issued as warnings.warn)
    _graph_module_before: object = field(default=None, repr=False, compare=False)  # kept for drawings only
    _graph_module_after: object = field(default=None, repr=False, compare=False)

    @property
    def trains_polynomial(self) -> bool:
        """method="polynomial": the model trains with polynomial attention; its distance to softmax is
        information, not a gate."""
        return self.options.get("method") == Method.POLYNOMIAL

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["sites"] = [s.as_dict() for s in self.sites]
        d["near_misses"] = [s.as_dict() for s in self.near_misses]
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [f"almostlinear report for {self.graph_name}: {len(self.sites)} attention site(s)"]
        header = ("id", "module", "source", "shapes q/k/v", "mask", "scale", "drop", "gqa", "decision", "reason")
        rows = [header]
        for s in self.sites:
            window = f", window {s.exact_window}" if s.exact_window else ""
            decision = f"{s.method}" + (f" (deg {s.degree}, r={s.rank}{window})" if s.degree and s.method == "polynomial"
                                        else "")
            rows.append(
                (
                    str(s.id),
                    (s.module_path or "(root)") + (f" [{s.region}]" if s.region else ""),
                    s.source_line or "-",
                    f"{_shape(s.q_shape)}/{_shape(s.k_shape)}/{_shape(s.v_shape)}",
                    s.mask_kind + (f"(w={s.window})" if s.window else ""),
                    "-" if s.scale is None else f"{s.scale:.4g}",
                    "-" if s.dropout_p is None else f"{s.dropout_p:g}",
                    str(s.gqa_groups),
                    decision,
                    s.reason,
                )
            )
        lines.extend(_table(rows))
        lines.extend(context_parallel_lines(self))
        calibrated = [s for s in self.sites if s.logit_bound is not None]
        if calibrated:
            lines.append("approximation (calibrated on the example inputs; errors relative to exact attention):")
            rows = [("id", "B=max|logit|", "eps on [-B,B]", "bound 2eps/(1-eps)*max|V|", "sampled err",
                     "measured err", "paper degree", "degree", "coefficients")]
            for s in calibrated:
                rows.append((str(s.id), f"{s.logit_bound:.3g}", f"{s.eps:.3g}", f"{s.predicted_error:.3g}",
                             _num(s.sampled_error), _num(s.measured_error), str(s.paper_degree),
                             str(s.degree or "-"), "fitted" if s.coefficients else "Taylor"))
            lines.extend("  " + line for line in _table(rows))
        lines.extend(approximability_map(self.sites))
        if self.near_misses:
            lines.append("softmax not rewritten (near misses):")
            for m in self.near_misses:
                lines.append(f"  - {m.module_path or '-'} {m.source_line or ''}: {m.reason}")
        for step in self.history:
            if "site" in step and math.isnan(step["measured_error"]):  # nothing measured: the event says why
                lines.append(f"  call {step['call']}: {step['event']}")
                continue
            if "site" in step:  # a re-check of one site
                lines.append(f"  call {step['call']}: site {step['site']} measured error {step['measured_error']:.3g} "
                             f"-> {step['decision']}")
                continue
            what = step.get("event") or f"planning step {step.get('step', 0)}"
            lines.append(f"  call {step.get('call', 0)} ({what}): end-to-end gradient error {step['grad_error']:.3g} "
                         f"with sites {step.get('approximated')} approximated")
        when = _when(self.grad_error_call)
        if self.grad_error is not None and self.trains_polynomial:
            lines.append(
                f"distance to softmax attention: end-to-end gradient error {self.grad_error:.3g} {when} (information: "
                f"method='polynomial' trains with polynomial attention, no budget applies); planning took "
                f"{self.planning_seconds:.2f} s"
            )
        elif self.grad_error is not None:
            verdict = "within" if self.grad_error <= self.budget else "OVER"
            lines.append(
                f"end-to-end gradient error {self.grad_error:.3g} {when} ({verdict} budget {self.budget:g}); "
                f"planning took {self.planning_seconds:.2f} s"
            )
        else:
            lines.append(f"end-to-end gradient error: not measured (no approximated site); budget {self.budget:g}")
        if self.grad_error is not None and self.grad_error_covers and not self.grad_error_call:
            lines.append(f"  the planning figure: {self.grad_error_covers}")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def context_parallel_lines(report: Report) -> list[str]:
    """The group size and, per site, how it reaches the other ranks' keys and what this rank sends per call."""
    cp = report.context_parallel
    if not cp:
        return []
    lines = [f"context parallel: the sequence is split over {cp['ranks']} rank(s) (this is rank {cp['rank']}); "
             f"per site and call this rank sends:"]
    for s in report.sites:
        sent = "-" if s.sent_bytes is None else f"{s.sent_bytes / 1e6:.3g} MB"
        lines.append(f"  site {s.id}: {sent} ({s.context_parallel})")
    return lines


def polynomial_row(row: Site, site, decision) -> None:
    """Fill the report row of a site rewritten to the polynomial op as `decision` (policy.Decision) says."""
    degree = decision.degree or 2
    row.rank = feature_rank(concrete_int(shape_of(site.q)[-1]) or 0, degree)
    row.rewritten, row.method, row.degree = True, Method.POLYNOMIAL, degree
    row.exact_window = decision.exact_window
    row.coefficients = tuple(decision.coefficients) if decision.coefficients else None
    kind = "fitted" if decision.coefficients else "Taylor"
    row.reason = f"{decision.reason}; polynomial degree {degree} ({kind}), rank {row.rank}, mask {site.mask.kind}"
    if decision.exact_window:
        near = "i - W < j <= i" if site.mask.causal else "|i - j| < W"
        row.reason += (f"; exact softmax on each query's window of W = {decision.exact_window} keys ({near}; "
                       f"exact_window), the polynomial beyond")
    if decision.heads is not None:
        groups = concrete_int(shape_of(site.q)[1]) // concrete_int(shape_of(site.op_kv[0])[1])
        row.approximated_heads = query_heads_of(decision.heads, groups)
        row.reason += f"; heads {row.approximated_heads} approximated, the others exact"


def query_heads_of(kv_heads, groups: int) -> list[int]:
    """The query heads computed by the key/value heads ``kv_heads`` when ``groups`` query heads share each (GQA):
    the form Site.approximated_heads takes."""
    return [h * groups + g for h in kv_heads for g in range(groups)]


def approximability_map(sites: list[Site]) -> list[str]:
    """Per calibrated site, per query head: the degree-2 error, the logit std and the effective number of keys
    (exp of the attention's entropy); * marks the heads the op computes now.  The numbers are those of the
    compile (call 0), except the error of a head a re-check measured, shown with its call (``0.012@25``: the
    op's output error on the inputs of training call 25); a head a re-check switched to exact is marked
    ``exact@N``.  The title says which."""
    mapped = [s for s in sites if s.heads]
    if not mapped:
        return []
    heads = [h for s in mapped for h in s.heads]
    width = max(len(s.heads) for s in mapped)
    rows = [("id", "module", *(f"h{h}" for h in range(width)))]
    for s in mapped:
        rows.append((str(s.id), s.module_path or "(root)", *map(_map_cell, s.heads), *[""] * (width - len(s.heads))))
    approximated = sum(h["approximated"] for h in heads)
    calls = sorted({h["recheck_call"] for h in heads if h.get("recheck_call") is not None}
                   | {h["switched_at"] for h in heads if h.get("switched_at") is not None})
    if not calls:
        title = (f"approximability map ({approximated} of {len(heads)} heads approximated, *; per head: sampled "
                 f"error / logit std / effective keys, at compile (call 0)):")
    else:
        title = (f"approximability map ({approximated} of {len(heads)} heads approximated, *, after the re-check at "
                 f"call {calls[-1]}; per head: error / logit std / effective keys, at compile (call 0) except "
                 f"error@N: the op's output error re-measured at call N (logit std and effective keys are not "
                 f"re-measured); (exact@N): switched to exact at call N):")
    return [title] + ["  " + line for line in _table(rows)]


def _map_cell(head: dict) -> str:
    call = head.get("recheck_call")
    error = f"{head['sampled_error']:.2g}" if call is None else f"{head['recheck_error']:.2g}@{call}"
    cell = f"{error}/{head['logit_std']:.2g}/{head['effective_keys']:.3g}" + ("*" if head["approximated"] else "")
    return cell + (f"(exact@{head['switched_at']})" if head.get("switched_at") is not None else "")


def _when(call: int) -> str:
    return "at compile (call 0)" if not call else f"at the re-check of call {call}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _shape(shape) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def emit(report: Report) -> None:
    """Log the report and emit it as a structured-trace artifact (visible in tlparse)."""
    for s in report.sites:
        log.info(
            "site %d %s (%s): mask=%s -> %s; %s", s.id, s.module_path, s.source_line, s.mask_kind, s.method, s.reason
        )
    for m in report.near_misses:
        log.debug("softmax at %s (%s) not rewritten: %s", m.module_path, m.source_line, m.reason)
    log.debug("graph after rewriting %s:\n%s", report.graph_name, report.graph_after)
    try:
        from torch._logging import trace_structured

        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "almostlinear_report", "encoding": "json"},
            payload_fn=report.to_json,
        )
    except Exception as exc:  # noqa: BLE001 - tracing is best effort and must never break compilation
        log.debug("structured trace not emitted: %s", exc)


# ---------------------------------------------------------------------------------------------------
# Rows from what the matcher found
# ---------------------------------------------------------------------------------------------------


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node was traced in (e.g. "transformer.h.0.attn")."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']+'\](\[\d+\])*\.?", "", str(path))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def source_line(node: fx.Node) -> str:
    """`file.py:line code` of the user's source line a node comes from."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return ""
    file, line, _, code = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line} {code.strip()[:60]}"


def _shape_of(node: Any) -> tuple | None:
    shape = shape_of(node)
    if shape is None:
        return None
    return tuple(concrete_int(d) if concrete_int(d) is not None else str(d) for d in shape)


def site_row(site, region: str = "") -> Site:
    """The report row of a matched site (an AttentionSite), before any decision."""
    dropout = dropout_probability(site)
    return Site(
        id=site.id, module_path=module_path(site.anchor), source_line=source_line(site.anchor), form=site.form,
        q_shape=_shape_of(site.q), k_shape=_shape_of(site.k), v_shape=_shape_of(site.v),
        mask_kind=site.mask.kind, causal=site.mask.causal, window=site.mask.window, scale=site.effective_scale,
        dropout_p=dropout if isinstance(dropout, (int, float)) else None, gqa_groups=site.gqa_groups,
        residual=site.residual.name if site.residual is not None else None, region=region,
    )


def _miss(node: fx.Node, form: str, reason: str, region: str = "", with_shape: bool = True) -> Site:
    return Site(id=-1, module_path=module_path(node), source_line=source_line(node), form=form,
                q_shape=_shape_of(node) if with_shape else None, mask_kind="-", method=Method.UNCHANGED,
                reason=reason, region=region)


def near_miss_rows(mha_calls: list, misses: list, regions: list) -> list[Site]:
    """Rows for what was not rewritten: nn.MultiheadAttention calls left as they are, softmax calls the
    matcher could not prove to be attention, and both inside higher-order op bodies (with the sites of a
    body that is not rewritten)."""
    rows = [_miss(node, "mha", f"nn.MultiheadAttention not rewritten: {reason}", with_shape=False)
            for node, reason in mha_calls if not node._erased]  # still in the graph: the call was left as it is
    rows += [_miss(miss.node, "softmax", miss.reason) for miss in misses]
    for region in regions:
        rows.extend(_region_near_misses(region))
    return rows


def _region_near_misses(region) -> list[Site]:
    """Near misses inside a higher-order op body; in a body that is not rewritten, its sites too."""
    def row(node, form: str, reason: str) -> Site:
        return _miss(node, form, f"{region.note}: {reason}", region.label_path)

    rows = [row(node, "mha", f"nn.MultiheadAttention not rewritten: {reason}")
            for node, reason in region.mha_calls if not node._erased]
    if not region.rewritable:
        why = ("the body is called from several places" if region.hop == "tag_activation_checkpoint"
               else f"only torch.utils.checkpoint bodies are rewritten, not those of `{region.hop}`")
        rows += [row(site.anchor, site.form, f"attention ({site.form}) not rewritten: {why}") for site in region.sites]
    rows += [row(miss.node, "softmax", miss.reason) for miss in region.misses]
    return rows
