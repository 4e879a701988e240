"""The torch.compile backend: prepare -> decide -> apply (-> budget search) -> report -> inner compiler.

    almostlinear_backend(gm, example_inputs)   registered as backend="almostlinear" (entry point)
    Backend(**options)                         a backend object that keeps the reports of its graphs
    compile_graph(gm, example_inputs, options) the one path both take (and the DDP backend)
"""
from __future__ import annotations

import collections
import itertools
import time
import warnings
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..kinds import Choice, Method
from ..passes.subgraphs import code_with_bodies, copy_with_bodies
from .options import Options
from .pipeline import Applied, prepare, apply
from .policy import decide
from .report import Report, emit

RECENT_REPORTS: collections.deque = collections.deque(maxlen=64)
_graph_counter = itertools.count()


def transform(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> tuple[Report, fx.GraphModule]:
    """Rewrite a copy of `gm` as the options say; the input graph module is left untouched."""
    report, applied = _transform(gm, example_inputs, options)
    return report, applied.graph_module


def _transform(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> tuple[Report, Applied]:
    started = time.perf_counter()
    report = Report(graph_name=f"graph_{next(_graph_counter)}", options=options.as_dict(), budget=options.budget,
                    graph_before=code_with_bodies(gm))
    if options.context_parallel:
        from ..passes.rewrite_context_parallel import ContextGroup

        group = ContextGroup.resolve(options.context_parallel)
        report.context_parallel = {"ranks": group.world, "rank": group.rank}
    prepared = prepare(gm, example_inputs)
    decisions = {site.id: decide(site, row, options) for site, row in zip(prepared.sites, prepared.rows)}
    if any(d.method is Method.POLYNOMIAL for d in decisions.values()):
        from .search import search_within_budget

        applied = search_within_budget(prepared, decisions, options, example_inputs, report)
    else:
        applied = apply(prepared, decisions, options)
    report.sites = applied.rows
    report.near_misses = list(prepared.near_misses)
    report.graph_after = code_with_bodies(applied.graph_module)
    report.planning_seconds = time.perf_counter() - started
    return report, applied


def hand_off(gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str) -> Callable:
    """Compile the rewritten graph with the inner compiler (on a copy: compile_fx mutates its input)."""
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(copy_with_bodies(gm), example_inputs)


DDP_PIECE_MARK = "DDPOptimizer"  # in gm.compile_subgraph_reason of every piece DDPOptimizer compiles
DDP_PIECE_ADVICE = ("almostlinear: DDPOptimizer split the graph (torch._dynamo.config.optimize_ddp=True) and the "
                    "backend sees one piece with fake inputs: an attention chain may be cut in two, buffer masks "
                    "cannot be evaluated and nothing is approximated. Use almostlinear.compile_for_ddp(model) or "
                    "set torch._dynamo.config.optimize_ddp = False (README, Distributed training).")
_warned_ddp_piece: set[int] = set()


def is_ddp_piece(gm: fx.GraphModule) -> bool:
    """Whether `gm` is one piece of a graph that DDPOptimizer split (not the whole captured graph)."""
    return DDP_PIECE_MARK in str(getattr(gm, "compile_subgraph_reason", "") or "")


def warn_ddp_piece(owner: object = None) -> None:
    """Warn once per backend object (once in all for the plain backend) that it compiles DDPOptimizer pieces."""
    if id(owner) not in _warned_ddp_piece:
        _warned_ddp_piece.add(id(owner))
        warnings.warn(DDP_PIECE_ADVICE, stacklevel=3)


def compile_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, reports: list | None = None,
    keep_graph_modules: bool = False, inner_compile: Callable | None = None,
) -> Callable:
    """Rewrite, report, and compile the rewritten graph with `inner_compile(work, example_inputs, report)`
    (default: the `inner` option's compiler; the DDP backend splits at DDP's buckets first)."""
    if inner_compile is None and is_ddp_piece(gm):
        warn_ddp_piece()
    report, applied = _transform(gm, example_inputs, options)
    work = applied.graph_module
    if keep_graph_modules:
        report._graph_module_before, report._graph_module_after = gm, work
    if reports is not None:
        reports.append(report)
    RECENT_REPORTS.append(report)
    emit(report)
    if inner_compile is None:
        compiled = hand_off(work, example_inputs, options.inner)
    else:
        compiled = inner_compile(work, example_inputs, report)
    if options.recheck_every and applied.op_nodes:
        from .recheck import Rechecker

        return Rechecker(compiled, work, report, options.budget, options.recheck_every, applied.op_nodes,
                         gate=options.method is not Choice.POLYNOMIAL)
    return compiled


def almostlinear_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options=None, mode=None) -> Callable:
    """The function registered as `backend="almostlinear"` (entry point group torch_dynamo_backends).

    `options` is the dict given to torch.compile(..., options=...); `mode` is accepted for
    compatibility and must be None or "default".
    """
    if mode not in (None, "default"):
        raise ValueError(f"almostlinear takes no torch.compile mode (valid: None, 'default'), got {mode!r}")
    return compile_graph(gm, example_inputs, Options.from_mapping(options))


class Backend:
    """`almostlinear.Backend(**options)`: a backend object that keeps the reports of every graph it compiled.

    >>> backend = Backend(budget=0.02)
    >>> compiled = torch.compile(model, backend=backend)
    >>> compiled(x); print(backend.reports[-1])
    """

    def __init__(self, **options: Any):
        self.options = Options.from_mapping(options)
        self.reports: list[Report] = []
        self.keep_graph_modules = False  # the inspect command keeps them to draw the graphs

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        return compile_graph(gm, example_inputs, self.options, self.reports, self.keep_graph_modules)

    def __deepcopy__(self, memo: dict) -> "Backend":
        """The backend itself: a copy would collect its reports where nobody reads them (Lightning deep-copies
        torch.compile's arguments once it is imported)."""
        return self

    def __repr__(self) -> str:
        return f"almostlinear.Backend({self.options.as_dict()})"


__all__ = ["Backend", "almostlinear_backend", "transform", "hand_off", "compile_graph", "RECENT_REPORTS",
           "is_ddp_piece", "warn_ddp_piece"]
