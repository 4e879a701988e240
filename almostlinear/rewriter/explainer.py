"""`almostlinear.explain(model, *args, **options)`: compile, run once, report, and leave no trace."""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator

import torch

from .backend import Backend
from ..passes.graph_utils import rng_preserved
from .report import Report


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Restore parameters, buffers and the CPU/CUDA RNG states on exit."""
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers())) if model is not None else {}
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    with rng_preserved():
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    if t.shape == saved[name].shape:
                        t.copy_(saved[name])


def merge_reports(reports: list[Report], name: str) -> Report:
    """One report for a model whose forward was captured as several graphs (graph breaks)."""
    if len(reports) == 1:
        return reports[0]
    if not reports:
        return Report(graph_name=name, options={}, graph_before="", graph_after="")
    merged = Report(graph_name=name, options=reports[0].options, budget=reports[0].budget)
    for r in reports:
        for s in r.sites:
            s.id = len(merged.sites)
            merged.sites.append(s)
        merged.near_misses.extend(r.near_misses)
        merged.history.extend(r.history)
        merged.planning_seconds += r.planning_seconds
    errors = [r.grad_error for r in reports if r.grad_error is not None]
    merged.grad_error = max(errors) if errors else None
    merged.graph_before = "\n".join(f"# {r.graph_name}\n{r.graph_before}" for r in reports)
    merged.graph_after = "\n".join(f"# {r.graph_name}\n{r.graph_after}" for r in reports)
    return merged


def explain(model: Any, *args: Any, kwargs: dict | None = None, dynamic: bool | None = None, **options: Any) -> Report:
    """Compile `model` with the almostlinear backend, run it once on `args`, and return the report.

    The model's parameters, buffers and the RNG state are as before; the inner compiler defaults to
    "eager" here (only the rewrite is of interest), pass inner="inductor" to include it.
    """
    options.setdefault("inner", "eager")
    backend = Backend(**options)
    module = model if isinstance(model, torch.nn.Module) else None
    with preserved_state(module):
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        compiled(*args, **(kwargs or {}))
    name = type(model).__name__ if module is not None else getattr(model, "__name__", "function")
    return merge_reports(backend.reports, name)
