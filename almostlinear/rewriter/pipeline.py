"""The pipeline: prepare a captured graph once, then apply any set of decisions to a fresh copy of it.

    prepared = prepare(gm, example_inputs)        copy -> decompose MHA -> normalize -> match -> masks,
                                                  checkpoint bodies (passes.subgraphs); immutable afterwards
    applied = apply(prepared, decisions, options) a fresh copy of the prepared graph (and bodies), each site
                                                  rewritten as its Decision says (passes.rewrite[_polynomial])

The policy decides once per site (policy.decide); the budget search (search.py) applies the all-exact
reference and every back-off step to the same prepared graph, never re-matching. Sites hold nodes of the
prepared graph; `apply` copies the graph with a node map and gives the rewrites copies of the sites whose
nodes are those of the copy (`remap_nodes`), so nothing a rewrite does reaches the prepared graph.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from ..kernels import taylor_coefficients
from ..kinds import Method
from ..passes import match as matcher
from ..passes import rewrite as rewriter
from ..passes.graph_utils import concrete_int, fake_mode_of, shape_of
from ..passes.mha import decompose_mha
from ..passes.normalize import normalize
from ..passes.rewrite_context_parallel import ContextGroup
from ..passes.rewrite_polynomial import rewrite_polynomial
from ..passes.subgraphs import Region, copy_graph_module, copy_with_node_map, find_regions
from .context_parallel import check_shard_lengths, raise_near_misses, rewrite_site_context_parallel
from .options import Options
from .policy import Decision
from .report import Site, log, near_miss_rows, polynomial_row, site_row


@dataclass(frozen=True)
class Prepared:
    """A captured graph, normalized and matched once. Never mutated after `prepare` returns."""

    graph_module: fx.GraphModule  # normalized copy; checkpoint bodies with attention replaced by private copies
    sites: tuple[matcher.AttentionSite, ...]  # ids 0..n-1 over the whole graph, bodies included
    rows: tuple[Site, ...]  # one report row per site (what was found; no decision yet)
    site_regions: tuple[Region | None, ...]  # the checkpoint body each site is in (None: the top-level graph)
    regions: tuple[Region, ...]  # higher-order op bodies with attention, outer ones first
    near_misses: tuple[Site, ...]  # softmax / nn.MultiheadAttention calls not rewritten, and why


@dataclass
class Applied:
    """One rewritten copy of the prepared graph, with the decisions as applied (a failed polynomial
    rewrite falls back to exact) and the report rows."""

    graph_module: fx.GraphModule
    rows: list[Site]
    decisions: dict[int, Decision]
    op_nodes: dict[int, fx.Node] = field(default_factory=dict)  # site id -> its polynomial op node
    sites: list = field(default_factory=list)  # the sites as rewritten (nodes of graph_module)


def remap_nodes(value: Any, node_map: dict[fx.Node, fx.Node]) -> Any:
    """`value` with every fx.Node it holds replaced through `node_map`: dataclasses are copied field by field,
    lists, tuples, sets and dicts rebuilt; anything else (tensors, numbers, strings) is shared."""
    if isinstance(value, fx.Node):
        return node_map.get(value, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        clone = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(clone, f.name, remap_nodes(getattr(value, f.name), node_map))
        return clone
    if isinstance(value, (list, set, frozenset)):
        return type(value)(remap_nodes(v, node_map) for v in value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return type(value)(remap_nodes(v, node_map) for v in value)
    if isinstance(value, dict):
        return {remap_nodes(k, node_map): remap_nodes(v, node_map) for k, v in value.items()}
    return value


def _match(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list, list, list]:
    work = copy_graph_module(gm)
    mha_calls = decompose_mha(work)  # nn.MultiheadAttention arrives as one opaque call
    normalize(work)
    sites, misses = matcher.find_sites(work, example_inputs)
    return work, sites, misses, mha_calls


def prepare(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Prepared:
    """Copy `gm` (left untouched), normalize and match it, and its checkpoint bodies."""
    work, sites, misses, mha_calls = _match(gm, example_inputs)
    try:
        regions = find_regions(work, example_inputs)  # checkpoint bodies: private copies, matched inside
    except Exception as exc:  # noqa: BLE001 - the top-level graph is still rewritten; bodies stay as captured
        log.warning("almostlinear: higher-order op bodies (checkpoints) not analysed: %s: %s", type(exc).__name__, exc)
        work, sites, misses, mha_calls = _match(gm, example_inputs)  # find_regions may have replaced bodies
        regions = []
    rows = [site_row(site) for site in sites]
    site_regions: list[Region | None] = [None] * len(sites)
    for region in regions:
        for site in region.sites if region.rewritable else ():
            site.id = len(rows)  # ids are unique over the whole graph (decisions are keyed by them)
            sites.append(site)
            rows.append(site_row(site, region.label_path))
            site_regions.append(region)
    return Prepared(work, tuple(sites), tuple(rows), tuple(site_regions), tuple(regions),
                    tuple(near_miss_rows(mha_calls, misses, regions)))


def _fresh_copy(prepared: Prepared) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node], list[fx.GraphModule]]:
    """A copy of the prepared graph and of every rewritable body (installed in the copied parent), the node
    map over all of them, and the body copies (outer ones first)."""
    work, node_map = copy_with_node_map(prepared.graph_module)
    copies = {id(prepared.graph_module): work}
    bodies = []
    for region in prepared.regions:
        parent = copies.get(id(region.parent))
        if not region.rewritable or parent is None:
            continue
        body, body_map = copy_with_node_map(region.body)
        parent.set_submodule(region.name, body)
        copies[id(region.body)] = body
        bodies.append(body)
        node_map.update(body_map)
    return work, node_map, bodies


def apply(prepared: Prepared, decisions: dict[int, Decision], options: Options) -> Applied:
    """Rewrite a fresh copy of the prepared graph with one Decision per site id."""
    work, node_map, bodies = _fresh_copy(prepared)
    owners = {module.graph: module for module in [work, *bodies]}
    fake_mode = fake_mode_of(work)
    applied = Applied(work, [], dict(decisions))
    group = ContextGroup.resolve(options.context_parallel) if options.context_parallel else None
    if group is not None:
        if prepared.near_misses:
            raise_near_misses(prepared.near_misses)
        check_shard_lengths(prepared.sites, group)
    for prepared_site, prepared_row, region in zip(prepared.sites, prepared.rows, prepared.site_regions):
        site = remap_nodes(prepared_site, node_map)
        row = dataclasses.replace(prepared_row)
        owner = owners[site.anchor.graph]
        if group is None:
            _rewrite_site(owner, site, row, fake_mode_of(owner) or fake_mode, options, applied)
        else:
            rewrite_site_context_parallel(owner, site, row, fake_mode_of(owner) or fake_mode, applied, group)
        # a later site may read this one's output (attention applied to an attention output): it reads the
        # node that replaced it
        node_map[prepared_site.output] = site.output
        if region is not None:
            _prefix_region(row, region)
        applied.rows.append(row)
        applied.sites.append(site)
    for body in reversed(bodies):  # innermost bodies first
        rewriter.finalize(body)
    rewriter.finalize(work)
    return applied


def _rewrite_site(gm: fx.GraphModule, site, row: Site, fake_mode, options: Options, applied: Applied) -> None:
    decision = applied.decisions[site.id]
    row.reason = decision.reason
    if site.mask.kind == "dense" and site.mask.reason:
        row.reason += f" [dense mask: {site.mask.reason}]"
    if decision.method is Method.UNCHANGED:
        row.method = Method.UNCHANGED
    elif decision.method is Method.POLYNOMIAL and _rewrite_polynomial(gm, site, row, decision, fake_mode, options,
                                                                      applied):
        pass
    else:
        _rewrite_exact(gm, site, row, fake_mode)


def _rewrite_polynomial(gm, site, row: Site, decision: Decision, fake_mode, options: Options, applied) -> bool:
    coefficients = decision.coefficients or taylor_coefficients(decision.degree or 2)
    try:
        applied.op_nodes[site.id] = rewrite_polynomial(gm, site, fake_mode, coefficients,
                                                       switchable=bool(options.recheck_every),
                                                       min_seq_len=decision.min_seq_len, heads=decision.heads,
                                                       guard=decision.guard, exact_window=decision.exact_window)
    except rewriter.RewriteError as exc:
        fallback = Decision(Method.EXACT, f"fused exact: the polynomial rewrite failed ({exc})")
        applied.decisions[site.id] = fallback
        row.reason = fallback.reason
        return False
    polynomial_row(row, site, decision)
    return True


def _rewrite_exact(gm, site, row: Site, fake_mode) -> None:
    try:
        desc = rewriter.rewrite_exact(gm, site, fake_mode)
        row.rewritten = "unchanged" not in desc
        row.method = Method.EXACT
        row.reason = f"{row.reason}; {desc}"
    except rewriter.RewriteError as exc:
        row.method, row.reason = Method.UNCHANGED, f"not rewritten: {exc}"


def _prefix_region(row: Site, region: Region) -> None:
    """Rows of a checkpoint body name it first (and why its masks are unknown, where they are)."""
    if not row.reason.startswith(f"fused exact: {region.note}"):
        row.reason = f"{region.note}: {row.reason}"
    if region.values_note and row.mask_kind != "none":
        row.reason += f" [mask values unknown: {region.values_note}]"


__all__ = ["Prepared", "Applied", "prepare", "apply", "remap_nodes"]
