"""The rewrite of each site when the sequence is split over a process group (options.context_parallel): polynomial
sites exchange fixed-size states, exact ones gather keys and values (passes/rewrite_context_parallel.py).

Nothing is left as written: a site or softmax the rewrite cannot shard would attend to this rank's keys only (a
silently different model), so it raises ContextParallelError naming the site and why.
"""
from __future__ import annotations

import torch.fx as fx

from ..kernels import taylor_coefficients
from ..kinds import Method
from ..passes.graph_utils import concrete_int, shape_of
from ..passes.rewrite import RewriteError
from ..passes.rewrite_context_parallel import (ContextGroup, rewrite_context_parallel_exact,
                                               rewrite_context_parallel_polynomial)
from .policy import Decision
from .report import Site, polynomial_row

__all__ = ["ContextParallelError", "rewrite_site_context_parallel", "raise_near_misses", "check_shard_lengths"]


class ContextParallelError(RuntimeError):
    """A site or softmax that cannot run on a sequence split over ranks (the message names it and says why)."""


def raise_near_misses(near_misses) -> None:
    lines = [f"  - {m.module_path or '-'} {m.source_line or ''}: {m.reason}" for m in near_misses]
    raise ContextParallelError(
        "almostlinear: context_parallel: these softmaxes were not recognised as attention, so they cannot be given "
        "the other ranks' keys (left as written they would attend to this rank's shard only):\n" + "\n".join(lines))


def check_shard_lengths(sites, group: ContextGroup) -> None:
    """Every rank holds at least one token (agreed: every rank raises the same error).  A rank with an empty shard
    would skip the planning's collectives on its empty rows while the others wait for it."""
    length = concrete_int(shape_of(sites[0].q)[-2]) if sites else 0  # no site found: as empty (collective anyway)
    lengths = group.lengths(-1 if length is None else length)
    empty = [r for r, n in enumerate(lengths) if n == 0]
    if empty:
        raise ContextParallelError(f"almostlinear: context_parallel: rank(s) {empty} hold an empty shard or no "
                                   f"attention site (shard lengths {lengths}); give every rank at least one token "
                                   f"(almostlinear.shard_lengths does whenever the sequence has >= {group.world})")


def rewrite_site_context_parallel(gm: fx.GraphModule, site, row: Site, fake_mode, applied,
                                  group: ContextGroup) -> None:
    """Rewrite one site for the group, fill its report row; raise ContextParallelError where it cannot be sharded."""
    decision: Decision = applied.decisions[site.id]
    row.reason = decision.reason
    where = f"site {site.id} ({row.module_path or '(root)'} {row.source_line or ''})"
    if decision.method is Method.UNCHANGED:
        raise ContextParallelError(f"almostlinear: context_parallel: {where} would be left as written ({decision.reason})"
                                   f", attending to this rank's shard only")
    if decision.method is Method.POLYNOMIAL:
        coefficients = decision.coefficients or taylor_coefficients(decision.degree or 2)
        try:
            applied.op_nodes[site.id], row.sent_bytes = rewrite_context_parallel_polynomial(
                gm, site, fake_mode, coefficients, group, decision.heads)
            polynomial_row(row, site, decision)
            row.context_parallel = "polynomial: the key states all-gathered, " + (
                "the earlier ranks' summed (causal)" if site.mask.causal else "all ranks' summed")
            if decision.heads is not None:
                row.context_parallel += "; the other heads exact over the all-gathered keys and values"
            return
        except RewriteError as exc:
            decision = Decision(Method.EXACT, f"fused exact: the context-parallel polynomial rewrite failed ({exc})")
            applied.decisions[site.id] = decision
            row.reason = decision.reason
    try:
        row.sent_bytes = rewrite_context_parallel_exact(gm, site, fake_mode, group)
    except RewriteError as exc:
        raise ContextParallelError(f"almostlinear: context_parallel: {where} cannot be split over ranks: {exc}") from None
    row.rewritten, row.method = True, Method.EXACT
    row.context_parallel = "exact: keys and values all-gathered, the global causal offset applied"
    row.reason += "; exact attention over the keys and values gathered from every rank"
