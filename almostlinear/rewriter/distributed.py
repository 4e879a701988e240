"""almostlinear under torch.distributed: DDP (and FSDP2) around a model compiled with backend="almostlinear".

What torch 2.13 does (measured: the README's "Distributed training" table; tests/distributed checks each row):

* With the default `torch._dynamo.config.optimize_ddp = True` ("ddp_optimizer") and a DDP module active,
  Dynamo hands the captured graph to DDPOptimizer, which splits it just before the parameter-using node at
  which a DDP bucket fills (`bucket_cap_mb`; the first bucket is 1 MiB) and calls the backend once per piece,
  with *fake* example inputs. A model whose parameters fill one bucket is not split at all. When it is split,
  the backend cannot evaluate buffer masks (causal `tril` buffers) or measure errors on fake inputs, and a
  piece boundary falls inside an attention chain whenever a parameter is used inside the chain (a learned
  temperature, a relative-position bias table).
* With `optimize_ddp=False` (or "python_reducer") the backend gets the whole graph with real inputs.

`compile_for_ddp(model, **options)` (or `DistributedBackend` with `optimize_ddp=False`) gives the backend the
whole graph in every mode, rewrites the attention there (real inputs, decisions agreed across ranks), and
then, when a DDP module is active, splits the *rewritten* graph at DDP's bucket boundaries with DDPOptimizer
itself, so the inner compiler still gets per-bucket pieces and DDP keeps its communication/backward overlap.

Decisions are agreed across ranks inside the budget search and re-checks (`measure.agree`, MAX over ranks);
`assert_same_decisions` checks the outcome and raises on any difference.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .backend import Backend, compile_graph, hand_off, is_ddp_piece, warn_ddp_piece
from .options import Options

log = logging.getLogger("almostlinear")



def optimize_ddp_mode() -> str:
    """Dynamo's DDP mode: "ddp_optimizer", "python_reducer", "python_reducer_without_compiled_forward",
    "no_optimization"."""
    from torch._dynamo.utils import get_optimize_ddp_mode

    return get_optimize_ddp_mode()


def active_ddp_module():
    """The DistributedDataParallel module whose forward is running now (None outside DDP.forward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def _has_fake(example_inputs: Sequence[Any]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(x, FakeTensor) for x in example_inputs)


def _copy_dynamo_sources(original: fx.GraphModule, work: fx.GraphModule) -> None:
    """DDPOptimizer reads Dynamo's attributes (`node._dynamo_source`, `gm._param_name_to_source`) that the
    rewrite's copy does not carry."""
    before = [n for n in original.graph.nodes if n.op == "placeholder"]
    after = [n for n in work.graph.nodes if n.op == "placeholder"]
    for old, new in zip(before, after):
        if hasattr(old, "_dynamo_source") and not hasattr(new, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    if hasattr(original, "compile_subgraph_reason") and not hasattr(work, "compile_subgraph_reason"):
        work.compile_subgraph_reason = original.compile_subgraph_reason
    if hasattr(original, "_param_name_to_source"):
        # AOTAutograd looks up a source for every parameter and buffer of a piece: the rewrite's own buffers
        # (re-check switches, length gates, static key masks) get a constant source of their own
        from torch._dynamo.source import ConstantSource

        sources = dict(original._param_name_to_source)
        for name, _ in work.named_buffers():
            if name.startswith("_almostlinear_"):
                sources.setdefault(name, ConstantSource(f"almostlinear.{name}"))
        work._param_name_to_source = sources


def _split(work, example_inputs, inner: str, ddp, original=None) -> tuple[Callable, int]:
    from torch._dynamo.backends.distributed import DDPOptimizer

    if original is not None:
        _copy_dynamo_sources(original, work)
    cap = int(ddp.bucket_bytes_cap)
    # torch 2.13's DDPOptimizer asserts first_bucket_cap (1 MiB by default) <= bucket_cap: bucket_cap_mb < 1
    # fails under plain optimize_ddp=True; here the first bucket is simply capped too.
    first = min(cap, int(getattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", cap)))
    optimizer = DDPOptimizer(bucket_bytes_cap=cap, first_bucket_cap=first,
                             backend_compile_fn=functools.partial(_inner, inner=inner))
    compiled = optimizer.compile_fn(work, list(example_inputs))
    pieces = len(optimizer.buckets)
    log.info("almostlinear: rewritten graph split into %d DDP bucket piece(s) for the inner compiler", pieces)
    return compiled, pieces


def _inner(gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str, **_: Any) -> Callable:
    return hand_off(gm, example_inputs, inner)


def compile_whole_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                        reports: list | None = None, keep_graph_modules: bool = False,
                        split_buckets: bool = True) -> Callable:
    """`backend.compile_graph`, but under DDP the rewritten graph is split at DDP's buckets afterwards."""
    ddp = active_ddp_module()
    if ddp is None or not split_buckets or options.inner == "eager" or optimize_ddp_mode() != "no_optimization":
        return compile_graph(gm, example_inputs, options, reports, keep_graph_modules)

    def split_inner(work: fx.GraphModule, inputs: Sequence[Any], report) -> Callable:
        compiled, report.ddp_pieces = _split(work, inputs, options.inner, ddp, original=gm)
        return compiled

    return compile_graph(gm, example_inputs, options, reports, keep_graph_modules, inner_compile=split_inner)


class DistributedBackend(Backend):
    """`Backend` for DDP: rewrite the whole graph, then split it at DDP's buckets for the inner compiler.

    Use it with `torch._dynamo.config.optimize_ddp = False` (or through `compile_for_ddp`, which sets it
    while the model runs): Dynamo then hands over the whole graph, and this backend re-creates DDPOptimizer's
    bucket pieces from the *rewritten* graph (`split_buckets=False`: one piece, no comm/compute overlap).
    Called on a DDPOptimizer piece (optimize_ddp left True), it warns and compiles the piece like the plain
    backend does.
    """

    def __init__(self, split_buckets: bool = True, **options: Any):
        super().__init__(**options)
        self.split_buckets = split_buckets
        self.pieces_seen = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        if is_ddp_piece(gm) or _has_fake(example_inputs):
            self.pieces_seen += 1
            warn_ddp_piece(self)
            return compile_graph(gm, example_inputs, self.options, self.reports, self.keep_graph_modules)
        return compile_whole_graph(gm, example_inputs, self.options, self.reports, self.keep_graph_modules,
                                   self.split_buckets)

    def __repr__(self) -> str:
        return f"almostlinear.rewriter.distributed.DistributedBackend({self.options.as_dict()})"


def compile_for_ddp(model: torch.nn.Module, backend: Backend | None = None, split_buckets: bool = True,
                    **options: Any) -> torch.nn.Module:
    """`torch.compile(model, backend=DistributedBackend(...))` whose calls run with optimize_ddp=False.

    Works for both orders, `DDP(compile_for_ddp(model))` and `compile_for_ddp(DDP(model))`; the result keeps
    torch.compile's module (state_dict keys under `_orig_mod.`). The backend (with its reports) is
    `compiled.almostlinear_backend`.
    """
    backend = backend if backend is not None else DistributedBackend(split_buckets=split_buckets, **options)
    compiled = torch.compile(model, backend=backend)
    forward = compiled.forward

    @functools.wraps(forward)
    def whole_graph_forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(optimize_ddp=False):
            return forward(*args, **kwargs)

    compiled.forward = whole_graph_forward
    compiled.almostlinear_backend = backend
    return compiled


def decision_signature(reports: Sequence[Any]) -> list[tuple]:
    """What must be identical on every rank: per graph and site, the method, degree, coefficients, the heads
    approximated and the exact window."""
    rows = []
    for index, report in enumerate(reports):
        for site in report.sites:
            coefficients = tuple(round(float(c), 12) for c in site.coefficients) if site.coefficients else None
            heads = tuple(site.approximated_heads) if site.approximated_heads else None
            rows.append((index, site.module_path, site.method, site.degree, coefficients, heads, site.exact_window))
    return rows


def assert_same_decisions(reports_or_backend: Any, group=None) -> list[tuple]:
    """All-gather the decision signature of every rank; raise RuntimeError naming the ranks that differ.

    Collective: every rank of `group` must call it. Returns this rank's signature.
    """
    import torch.distributed as dist

    reports = reports_or_backend.reports if isinstance(reports_or_backend, Backend) else reports_or_backend
    mine = decision_signature(reports)
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differ = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        raise RuntimeError(f"almostlinear: ranks {differ} took different decisions from rank 0:\n"
                           + "\n".join(f"  rank {r}: {s}" for r, s in enumerate(everyone)))
    return mine


__all__ = [
    "DistributedBackend",
    "compile_for_ddp",
    "assert_same_decisions",
    "decision_signature",
    "optimize_ddp_mode",
    "active_ddp_module",
    "is_ddp_piece",
    "compile_whole_graph",
]
