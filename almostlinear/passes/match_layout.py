"""One layout per site (`unify_layout`): the finest split of the leading (batch, head) dims seen on its
path. q, k, v and the mask tensors are split to it (or a reshape they came from is peeled off), and the
steps that merge the output back to the graph's layout are recorded (`AttentionSite.output_layout`).
`LayoutInserter` adds the conversion nodes, also for the multi-query broadcast (`match_heads`)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from .graph_utils import annotate, example_value, fake_mode_of, fake_value, shape_of
from .mask_ops import MaskContext, MaskOp
from .match_rules import last_two_dims_swapped, layout_ancestors, same_size, same_sizes
from .site import AttentionSite, NotAttention


def leading_dims(node: Any) -> tuple | None:
    """The dims before the last two (batch, heads), or None without a shape of rank >= 2."""
    shape = shape_of(node)
    return None if shape is None or len(shape) < 2 else tuple(shape[:-2])


def merge_groups(coarse: Sequence, fine: Sequence) -> list[list[int]] | None:
    """For each coarse leading dim, the run of fine dims it merges (row-major), or None when the coarse
    layout is not a merge of the fine one. An empty run: a size-1 coarse dim the fine layout does not have."""
    groups, i = [], 0
    for size in coarse:
        if same_size(size, 1) and (i >= len(fine) or not same_size(fine[i], 1)):
            groups.append([])
            continue
        group, product = [], 1
        while not (group and same_size(product, size)):
            if i >= len(fine):
                return None
            group.append(i)
            product = product * fine[i]
            i += 1
        groups.append(group)
    while i < len(fine):  # trailing size-1 fine dims join the last run
        if not same_size(fine[i], 1) or not groups:
            return None
        groups[-1].append(i)
        i += 1
    return groups


class LayoutInserter:
    """Adds the layout conversions of one site before its output node, with fake values, and keeps the
    networkx data-flow graph of the mask analysis in step."""

    def __init__(self, gm: fx.GraphModule, ctx: MaskContext, site: AttentionSite):
        self.gm, self.ctx, self.site, self.fake_mode = gm, ctx, site, fake_mode_of(gm)
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        chain = set(site.chain)
        limit = position[site.output]
        self.sizes = [n for n in gm.graph.nodes  # SymInt values the graph already computes (dynamic shapes)
                      if position[n] < limit and isinstance(example_value(n), torch.SymInt)
                      and not (set(n.all_input_nodes) & chain)]

    def method(self, name: str, args: tuple) -> fx.Node:
        with self.gm.graph.inserting_before(self.site.output):
            node = self.gm.graph.call_method(name, args)
        annotate(node, fake_value(self.fake_mode, name, args, {}, method=True), self.site.anchor)
        node.meta["almostlinear_inserted"] = True
        self.site.inserted.append(node)
        self.ctx.graph.add_node(node)
        for source in node.all_input_nodes:
            self.ctx.graph.add_edge(source, node)
        return node

    def size(self, value: Any) -> Any:
        """`value` as a graph argument: an int, or a node computing that SymInt; None when the graph has none."""
        if isinstance(value, int):
            return value
        try:
            from torch.fx.experimental.symbolic_shapes import is_concrete_int

            if is_concrete_int(value):
                return int(value)
        except Exception:  # noqa: BLE001 - a size that cannot be read as an int is looked up below
            pass
        for node in self.sizes:
            if same_size(example_value(node), value):
                return node
        return None

    def unflatten_sizes(self, sizes: Sequence) -> tuple:
        args = [self.size(s) for s in sizes]
        if sum(a is None for a in args) > 1:
            raise NotAttention("the site's layout change has symbolic sizes the graph does not compute")
        return tuple(-1 if a is None else a for a in args)

    def split(self, x: fx.Node, groups: list[list[int]], fine: Sequence, offset: int) -> fx.Node:
        """Split the leading dims of `x` (starting at `offset` among the coarse dims) by `groups`: a full dim
        is unflattened, a size-1 (broadcast) dim becomes size-1 dims, an empty group drops a size-1 dim."""
        shape = shape_of(x)
        lead = len(shape) - 2
        target = []  # the leading dims after the split
        for j in range(lead):
            group = groups[offset + j]
            target += [1] * len(group) if same_size(shape[j], 1) else [fine[i] for i in group]
        for ancestor in layout_ancestors(x)[1:]:  # it was reshaped from that layout: use the tensor before
            before = shape_of(ancestor)
            if same_sizes(before[:-2], target) and same_sizes(before[-2:], shape[-2:]):
                return ancestor
        for j in reversed(range(lead)):  # last first: earlier dims keep their index
            group = groups[offset + j]
            if len(group) == 1:
                continue
            if not group:
                if not same_size(shape[j], 1):
                    raise NotAttention("a mask tensor does not fit the site's layout")
                x = self.method("squeeze", (x, j))
            elif same_size(shape[j], 1):
                for _ in group[1:]:
                    x = self.method("unsqueeze", (x, j))
            else:
                x = self.method("unflatten", (x, j, self.unflatten_sizes([fine[i] for i in group])))
        return x


def _fine_layout(site: AttentionSite) -> tuple[tuple, list[tuple]]:
    """The finest leading layout on the site's path, and the leading dims of each node on that path."""
    score_nodes = [n for n in site.chain if n is not site.k and not last_two_dims_swapped(n)]
    output = [] if site.einsum_perms.get("out") else [site.output]  # (an einsum output in its own layout)
    path = [leading_dims(n) for n in score_nodes + output]
    candidates = path + [leading_dims(n) for n in layout_ancestors(site.q)]
    if any(c is None for c in candidates):
        raise NotAttention("a tensor of the site has no shape")
    return max(candidates, key=len), path  # the first of the longest: the path's own layout before q's ancestors


def _split_mask_tensors(ops: list[MaskOp], fine: tuple, inserter: LayoutInserter) -> None:
    """Each mask tensor (and tensor fill value) split to the site's layout."""
    for op in ops:
        coarse = leading_dims(op.node)
        if op.kind == "scale" or coarse is None or same_sizes(coarse, fine):
            continue
        groups = merge_groups(coarse, fine)
        op.tensor = _split_mask_tensor(op.tensor, coarse, groups, fine, inserter)
        op.value = _split_mask_tensor(op.value, coarse, groups, fine, inserter)


def _split_mask_tensor(t: Any, coarse: tuple, groups: list, fine: tuple, inserter: LayoutInserter) -> Any:
    if not isinstance(t, fx.Node) or (shape_of(t) or ()) == ():
        return t
    extra = len(coarse) + 2 - len(shape_of(t))
    if extra < 0:
        raise NotAttention("a mask tensor has more dims than the scores")
    return inserter.split(t, groups, fine, extra)


def _to_fine(x: fx.Node, fine: tuple, inserter: LayoutInserter) -> fx.Node:
    """q, k or v in the site's layout: a tensor it was reshaped from, else split."""
    for ancestor in layout_ancestors(x):
        if same_sizes(leading_dims(ancestor), fine) and same_sizes(shape_of(ancestor)[-2:], shape_of(x)[-2:]):
            return ancestor
    groups = merge_groups(leading_dims(x), fine)
    if groups is None:
        raise NotAttention("q, k or v is laid out across the batch/head dims differently from the weights")
    return inserter.split(x, groups, fine, 0)


def _output_steps(out_groups: list[list[int]]) -> list[tuple]:
    """Site layout -> the output's layout, last dims first."""
    steps = []
    for j in reversed(range(len(out_groups))):
        first = out_groups[j][0] if out_groups[j] else None
        if first is None:
            steps.append(("unsqueeze", sum(len(g) for g in out_groups[:j])))
        elif len(out_groups[j]) > 1:
            steps.append(("flatten", first, out_groups[j][-1]))
    return steps


def unify_layout(site: AttentionSite, gm: fx.GraphModule, ctx: MaskContext) -> None:
    """Bring q, k, v and the mask tensors to the finest leading layout on the site's path; record how the
    output goes back. Nothing is inserted when the whole site already shares one layout."""
    fine, path = _fine_layout(site)
    leads = path + [leading_dims(site.q), leading_dims(site.k), leading_dims(site.v)]
    if all(same_sizes(lead, fine) for lead in leads):
        return
    if any(merge_groups(lead, fine) is None for lead in path):
        raise NotAttention("attention weights are reshaped across the batch/head dims (not a split or merge)")
    inserter = LayoutInserter(gm, ctx, site)
    _split_mask_tensors(site.pre_transform_ops + site.mask_ops, fine, inserter)
    site.q, site.k, site.v = (_to_fine(x, fine, inserter) for x in (site.q, site.k, site.v))
    site.output_layout = _output_steps(merge_groups(leading_dims(site.output), fine))
