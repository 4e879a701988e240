"""The torch.compile backend: normalize -> match -> plan -> rewrite -> report -> inner compiler."""
from __future__ import annotations

import collections
import copy
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..passes import match as matcher
from ..passes import rewrite as rewriter
from ..passes.graph_utils import concrete_int, fake_mode_of, shape_of
from ..passes.mha import decompose_mha
from ..passes.normalize import normalize
from ..passes.subgraphs import Region, code_with_bodies, copy_with_bodies, find_regions
from .options import Options
from .plan import Decision, decide
from .report import Report, Site, emit, log

RECENT_REPORTS: collections.deque = collections.deque(maxlen=64)
_graph_counter = itertools.count()


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']+'\](\[\d+\])*\.?", "", str(path))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return ""
    file, line, _, code = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line} {code.strip()[:60]}"


def _shape(node: Any) -> tuple | None:
    shape = shape_of(node)
    if shape is None:
        return None
    return tuple(concrete_int(d) if concrete_int(d) is not None else str(d) for d in shape)


def _site_row(site: matcher.AttentionSite, path: str) -> Site:
    dropout = site.dropout_p if isinstance(site.dropout_p, (int, float)) else None
    if site.form == "eager" and site.dropout_training is False:
        dropout = 0.0
    return Site(
        id=site.id,
        module_path=path,
        source_line=_source_line(site.anchor),
        form=site.form,
        q_shape=_shape(site.q),
        k_shape=_shape(site.k),
        v_shape=_shape(site.v),
        mask_kind=site.mask.kind,
        causal=site.mask.causal,
        window=site.mask.window,
        scale=site.effective_scale,
        dropout_p=dropout,
        gqa_groups=site.gqa_groups,
        residual=site.residual.name if site.residual is not None else None,
    )


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module we may rewrite: new graph and nodes (meta copied), the same attributes."""
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    work.meta = dict(getattr(gm, "meta", {}))
    return work


@dataclass
class Build:
    """One rewritten copy of the captured graph, with the site rows and the decisions applied."""

    work: fx.GraphModule
    sites: list
    rows: list[Site]
    decisions: dict[int, Decision]
    misses: list
    mha_calls: list
    poly_nodes: dict = field(default_factory=dict)  # site id -> the poly_attention node
    regions: list = field(default_factory=list)  # higher-order op bodies with attention (checkpoints)


def _apply(work: fx.GraphModule, site, row: Site, decision: Decision, fake_mode, options: Options, build: Build) -> None:
    row.reason = decision.reason
    if site.mask.kind == "dense" and site.mask.reason:
        row.reason += f" [dense mask: {site.mask.reason}]"
    if decision.method == "unchanged":
        row.method = "unchanged"
        return
    if decision.method == "polynomial":
        from .approximate import rewrite_polynomial

        try:
            row.rank, desc = rewrite_polynomial(work, site, fake_mode, options, decision)
            row.rewritten, row.method, row.degree = True, "polynomial", decision.degree
            row.coefficients = tuple(decision.coefficients) if decision.coefficients else None
            row.reason = f"{decision.reason}; {desc}"
            build.poly_nodes[site.id] = getattr(site, "op_node", site.output)
            return
        except rewriter.RewriteError as exc:
            decision = Decision("exact", f"fused exact: the polynomial rewrite failed ({exc})")
            build.decisions[site.id] = decision
            row.reason = decision.reason
    try:
        desc = rewriter.rewrite_exact(work, site, fake_mode)
        row.rewritten = "unchanged" not in desc
        row.method = "exact"
        row.reason = f"{row.reason}; {desc}"
    except rewriter.RewriteError as exc:
        row.method, row.reason = "unchanged", f"not rewritten: {exc}"


def build(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
          chosen: dict[int, Decision] | None = None) -> Build:
    """Copy, normalize, match and rewrite with the given decisions (the options decide the rest)."""
    work = _copy(gm)
    mha_calls = decompose_mha(work)  # nn.MultiheadAttention arrives as one opaque call
    normalize(work)
    sites, misses = matcher.find_sites(work, example_inputs)
    try:
        regions = find_regions(work, example_inputs)  # checkpoint bodies: private copies, matched inside
    except Exception as exc:  # noqa: BLE001 - the top-level graph is still rewritten; bodies stay as captured
        log.warning("almostlinear: higher-order op bodies (checkpoints) not analysed: %s: %s", type(exc).__name__, exc)
        work = _copy(gm)
        mha_calls = decompose_mha(work)
        normalize(work)
        sites, misses = matcher.find_sites(work, example_inputs)
        regions = []
    fake_mode = fake_mode_of(work)
    result = Build(work, list(sites), [], {}, misses, mha_calls, regions=regions)
    for site in sites:
        path = _module_path(site.anchor)
        row = _site_row(site, path)
        decision = (chosen or {}).get(site.id) or decide(site, path, options)
        result.decisions[site.id] = decision
        _apply(work, site, row, decision, fake_mode, options, result)
        result.rows.append(row)
    for region in regions:
        if region.rewritable:
            _apply_region(region, fake_mode, options, chosen or {}, result)
    for region in reversed(regions):  # innermost bodies first
        if region.rewritable:
            rewriter.finalize(region.body)
    rewriter.finalize(work)
    return result


def _apply_region(region: Region, fake_mode, options: Options, chosen: dict[int, Decision], result: Build) -> None:
    """Rewrite the sites of one checkpoint body in the body itself (the higher-order op call stays, so the
    region is still recomputed in the backward). Checkpointed sites are kept exact: the budget planning
    measures the polynomial op's errors by running the top-level graph node by node, and a body runs as one
    call there, so an approximation inside it could be neither calibrated nor measured nor re-checked."""
    fake_mode = fake_mode_of(region.body) or fake_mode
    for site in region.sites:
        site.id = len(result.sites)  # ids are unique over the whole graph (decisions are keyed by them)
        result.sites.append(site)
        path = _module_path(site.anchor)
        row = _site_row(site, path)
        row.region = region.label_path
        decision = chosen.get(site.id) or decide(site, path, options)
        if decision.method == "polynomial":
            decision = Decision("exact", f"fused exact: {region.note}: the budget planning cannot measure the "
                                         f"polynomial op's error inside a checkpoint body (else: {decision.reason})")
        result.decisions[site.id] = decision
        _apply(region.body, site, row, decision, fake_mode, options, result)
        if not row.reason.startswith(f"fused exact: {region.note}"):
            row.reason = f"{region.note}: {row.reason}"
        if region.values_note and site.mask.kind != "none":
            row.reason += f" [mask values unknown: {region.values_note}]"
        result.rows.append(row)


def _near_misses(result: Build) -> list[Site]:
    rows = []
    for node, reason in result.mha_calls:
        if not getattr(node, "_erased", False):  # still in the graph: the call was left as it is
            rows.append(Site(id=-1, module_path=_module_path(node), source_line=_source_line(node), form="mha",
                             mask_kind="-", method="unchanged", reason=f"nn.MultiheadAttention not rewritten: {reason}"))
    for miss in result.misses:
        rows.append(Site(id=-1, module_path=_module_path(miss.node), source_line=_source_line(miss.node),
                         form="softmax", q_shape=_shape(miss.node), mask_kind="-", method="unchanged",
                         reason=miss.reason))
    for region in result.regions:
        rows.extend(_region_near_misses(region))
    return rows


def _region_near_misses(region: Region) -> list[Site]:
    """Near misses inside a higher-order op body; in a body that is not rewritten, its sites too."""
    rows = []

    def row(node, form: str, reason: str) -> Site:
        return Site(id=-1, module_path=_module_path(node), source_line=_source_line(node), form=form,
                    q_shape=_shape(node), mask_kind="-", method="unchanged", reason=f"{region.note}: {reason}",
                    region=region.label_path)

    for node, reason in region.mha_calls:
        if not getattr(node, "_erased", False):
            rows.append(row(node, "mha", f"nn.MultiheadAttention not rewritten: {reason}"))
    if not region.rewritable:
        why = ("the body is called from several places" if region.hop == "tag_activation_checkpoint"
               else f"only torch.utils.checkpoint bodies are rewritten, not those of `{region.hop}`")
        for site in region.sites:
            rows.append(row(site.anchor, site.form, f"attention ({site.form}) not rewritten: {why}"))
    for miss in region.misses:
        rows.append(row(miss.node, "softmax", miss.reason))
    return rows


def transform(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> tuple[Report, fx.GraphModule]:
    """Rewrite a copy of `gm` as the options say; the input graph module is left untouched."""
    report, work, _ = _transform(gm, example_inputs, options)
    return report, work


def _transform(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options):
    started = time.perf_counter()
    name = f"graph_{next(_graph_counter)}"
    report = Report(graph_name=name, options=options.as_dict(), budget=options.budget,
                    graph_before=code_with_bodies(gm))
    result = build(gm, example_inputs, options)
    if result.poly_nodes:
        from .planning import plan_within_budget

        result = plan_within_budget(gm, example_inputs, options, result, build, report)
    report.sites = result.rows
    report.near_misses = _near_misses(result)
    report.graph_after = code_with_bodies(result.work)
    report.planning_seconds = time.perf_counter() - started
    return report, result.work, result.poly_nodes


def hand_off(gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str) -> Callable:
    """Compile the rewritten graph with the inner compiler (on a copy: compile_fx mutates its input)."""
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(copy_with_bodies(gm), example_inputs)


_warned_ddp_piece = False


def _warn_if_ddp_piece(gm: fx.GraphModule) -> None:
    """DDPOptimizer (optimize_ddp=True) compiles a split graph piece by piece, with fake inputs."""
    global _warned_ddp_piece
    if _warned_ddp_piece or "DDPOptimizer" not in str(getattr(gm, "compile_subgraph_reason", "") or ""):
        return
    _warned_ddp_piece = True
    log.warning("almostlinear: DDPOptimizer split this graph at DDP bucket boundaries "
                "(torch._dynamo.config.optimize_ddp=True); each piece arrives with fake inputs, so attention is "
                "only rewritten exact and a chain that uses a parameter may be cut in two. Use "
                "almostlinear.rewriter.distributed.compile_for_ddp(model) or optimize_ddp=False "
                "(README, Distributed training).")


def compile_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, reports: list | None = None,
    keep_graph_modules: bool = False, inner_compile: Callable | None = None,
) -> Callable:
    """Rewrite, report, and compile the rewritten graph with `inner_compile(work, example_inputs, report)`
    (default: the `inner` option's compiler; the DDP backend splits at DDP's buckets first)."""
    if inner_compile is None:
        _warn_if_ddp_piece(gm)
    report, work, poly_nodes = _transform(gm, example_inputs, options)
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
    if options.recheck_every and poly_nodes:
        from .recheck import Rechecker

        return Rechecker(compiled, work, report, options.budget, options.recheck_every, poly_nodes)
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

    def __repr__(self) -> str:
        return f"almostlinear.Backend({self.options.as_dict()})"


__all__ = ["Backend", "almostlinear_backend", "transform", "hand_off", "compile_graph", "RECENT_REPORTS"]
