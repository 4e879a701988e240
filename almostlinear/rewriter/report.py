"""What the backend found and did: `Site` rows, the `Report` table, logging and the tlparse artifact."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

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
    method: str = "exact"  # "exact" | "polynomial" | "unchanged"
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
    budget: float = 0.05
    graph_before: str = ""
    graph_after: str = ""
    planning_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    _graph_module_before: object = field(default=None, repr=False, compare=False)  # kept for drawings only
    _graph_module_after: object = field(default=None, repr=False, compare=False)

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
            decision = f"{s.method}" + (f" (deg {s.degree}, r={s.rank})" if s.degree and s.method == "polynomial" else "")
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
        if self.near_misses:
            lines.append("softmax not rewritten (near misses):")
            for m in self.near_misses:
                lines.append(f"  - {m.module_path or '-'} {m.source_line or ''}: {m.reason}")
        for step in self.history:
            if "site" in step:  # a re-check of one site
                lines.append(f"  call {step['call']}: site {step['site']} measured error {step['measured_error']:.3g} "
                             f"-> {step['decision']}")
                continue
            what = step.get("event") or f"planning step {step.get('step', 0)}"
            lines.append(f"  call {step.get('call', 0)} ({what}): end-to-end gradient error {step['grad_error']:.3g} "
                         f"with sites {step.get('approximated')} approximated")
        if self.grad_error is not None:
            verdict = "within" if self.grad_error <= self.budget else "OVER"
            lines.append(
                f"end-to-end gradient error {self.grad_error:.3g} ({verdict} budget {self.budget:g}); "
                f"planning took {self.planning_seconds:.2f} s"
            )
        else:
            lines.append(f"end-to-end gradient error: not measured (no approximated site); budget {self.budget:g}")
        return "\n".join(lines)


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
