"""almostlinear under the training loops people use: Hugging Face `Trainer`, accelerate, Lightning.

Nothing here is needed to *compile*: each library already runs a model that was compiled in place,

    backend = almostlinear.Backend(budget=0.05, recheck_every=100)
    model.compile(backend=backend)          # nn.Module.compile: same class, same forward signature

and then hands it to `Trainer(model=model, ...)`, `accelerator.prepare(model, ...)`, or (inside a
`LightningModule`) trains it as usual. This module only adds what the libraries leave to us: callbacks that
show the backend's reports (sites found, methods, measured errors, re-check events) during and after
training.

* `almostlinear.integrations.huggingface.ReportCallback`: a `transformers.TrainerCallback`
  (also `almostlinear.integrations.TrainerReportCallback`).
* `almostlinear.integrations.lightning.ReportCallback`: a `lightning.pytorch.Callback`
  (also `almostlinear.integrations.LightningReportCallback`).
* `summarize(reports)`, `format_reports(reports)` and `ReportWatcher`: the library-free parts both use.

transformers, accelerate and lightning are optional: this package imports none of them until one of the
callbacks is asked for.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

log = logging.getLogger("almostlinear")

__all__ = ["summarize", "format_reports", "reports_of", "ReportWatcher", "WatchedReports", "TrainerReportCallback",
           "LightningReportCallback"]


def reports_of(source: Any = None) -> list:
    """The reports behind `source`: a `Backend` (its `.reports`), a module compiled by `compile_for_ddp`
    (its `.almostlinear_backend`), a list of reports, or None: `almostlinear.last_reports()` (the graphs
    compiled through `backend="almostlinear"`)."""
    if source is None:
        import almostlinear

        return almostlinear.last_reports()
    backend = getattr(source, "almostlinear_backend", None)
    if backend is not None:
        source = backend
    reports = getattr(source, "reports", source)
    if not isinstance(reports, (list, tuple)):
        raise TypeError(f"expected an almostlinear.Backend, a module compiled by compile_for_ddp, a list of reports "
                        f"or None; got {type(source).__name__}")
    return list(reports)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def summarize(reports: Iterable) -> dict[str, Any]:
    """Numbers a logger can take: graphs compiled, attention sites found, sites rewritten, sites per method
    now (after re-checks), the largest end-to-end gradient error measured (None if nothing was approximated)
    and the number of re-checks and switches to exact recorded so far."""
    reports = list(reports)
    sites = [s for r in reports for s in r.sites]
    methods: dict[str, int] = {}
    for s in sites:
        methods[s.method] = methods.get(s.method, 0) + 1
    errors = [r.grad_error for r in reports if _finite(r.grad_error)]
    rechecks = [h for r in reports for h in r.history if "site" in h]
    return {
        "graphs": len(reports),
        "sites": len(sites),
        "rewritten": sum(1 for s in sites if s.rewritten),
        "exact": methods.get("exact", 0),
        "polynomial": methods.get("polynomial", 0),
        "unchanged": methods.get("unchanged", 0),
        "grad_error": max(errors) if errors else None,
        "budget": max((r.budget for r in reports), default=None),
        "rechecks": len(rechecks),
        "switched_to_exact": sum(1 for h in rechecks if h.get("decision") == "exact"),
    }


def format_reports(reports: Iterable, only_with_sites: bool = True) -> str:
    """One block of text: a summary line, then each report (`str(report)`); graphs without attention
    (a loss function Dynamo compiled separately, for example) are counted but not printed."""
    reports = list(reports)
    s = summarize(reports)
    err = "not measured" if s["grad_error"] is None else f"{s['grad_error']:.3g}"
    head = (f"almostlinear: {s['graphs']} graph(s), {s['sites']} attention site(s), {s['rewritten']} rewritten "
            f"({s['exact']} exact, {s['polynomial']} polynomial, {s['unchanged']} unchanged); largest end-to-end "
            f"gradient error {err} (budget {s['budget']}); {s['rechecks']} site re-check(s), "
            f"{s['switched_to_exact']} switched to exact")
    shown = [r for r in reports if r.sites or r.near_misses or not only_with_sites]
    return "\n\n".join([head] + [str(r) for r in shown])


class ReportWatcher:
    """Tracks a backend's reports between two looks and says what is new: graphs compiled since (with their
    sites and decisions) and re-check events appended to a report's history since."""

    def __init__(self, source: Any = None):
        self.source = source
        self._seen: dict[int, int] = {}  # id(report) -> history entries already seen
        self.events: list[dict[str, Any]] = []

    def reports(self) -> list:
        return reports_of(self.source)

    def poll(self, step: int | None = None) -> list[dict[str, Any]]:
        """New events since the last poll (also appended to `.events`)."""
        new: list[dict[str, Any]] = []
        for report in self.reports():
            key = id(report)
            if key not in self._seen:
                # planning steps (call 0) are part of the compile event; later entries are re-checks
                self._seen[key] = sum(1 for h in report.history if h.get("call", 0) == 0)
                methods = [s.method for s in report.sites]
                new.append({"kind": "compiled", "step": step, "graph": report.graph_name, "sites": len(report.sites),
                            "methods": methods, "grad_error": report.grad_error, "budget": report.budget,
                            "text": f"compiled {report.graph_name}: {len(report.sites)} attention site(s) "
                                    f"{_site_list(report)}; end-to-end gradient error "
                                    f"{_num(report.grad_error)} (budget {report.budget:g})"})
        for report in self.reports():
            key = id(report)
            for entry in report.history[self._seen[key]:]:
                new.append({"kind": "recheck", "step": step, "graph": report.graph_name, **entry,
                            "text": f"{report.graph_name} call {entry.get('call')}: "
                                    f"{entry.get('event') or 're-check'}"
                                    + (f", error {_num(entry.get('grad_error'))}" if "grad_error" in entry else "")})
            self._seen[key] = len(report.history)
        for event in new:
            log.info("almostlinear%s: %s", "" if step is None else f" (step {step})", event["text"])
        self.events.extend(new)
        return new

    def summary(self) -> dict[str, Any]:
        return summarize(self.reports())

    def text(self) -> str:
        return format_reports(self.reports())


class WatchedReports:
    """What both callbacks offer (mixed into them): `.events`, `.reports()`, `.summary()`, `.text()` of the
    `ReportWatcher` kept in `self.watcher`."""

    watcher: ReportWatcher

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.watcher.events

    def reports(self) -> list:
        return self.watcher.reports()

    def summary(self) -> dict[str, Any]:
        return self.watcher.summary()

    def text(self) -> str:
        return self.watcher.text()


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _site_list(report) -> str:
    if not report.sites:
        return ""
    return "(" + ", ".join(f"{s.module_path or '(root)'}: {s.method}" for s in report.sites) + ")"


def __getattr__(name: str):  # the callbacks import their library only when asked for
    if name == "TrainerReportCallback":
        from .huggingface import ReportCallback

        return ReportCallback
    if name == "LightningReportCallback":
        from .lightning import ReportCallback

        return ReportCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
