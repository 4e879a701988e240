"""Replace attention sites with one fused call: SDPA (exact) or an almostlinear op (approximate).

Every new node gets `example_value`/`val` (computed under the graph's fake mode) and the
`stack_trace`/`nn_module_stack` of the site it replaces, so Inductor does not warn (pytorch #114873)
and reports point at the user's source. The passes know the approximate ops only by name.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .builder import NodeBuilder
from .graph_utils import is_number, may_erase_unused, tensor_meta
from .mask_ops import BLOCKED_BELOW
from .match import SDPA
from .site import AttentionSite


class RewriteError(Exception):
    """The site cannot be rewritten as asked; the message is the reason kept in the report."""


def _dtype(node: Any) -> torch.dtype | None:
    meta = tensor_meta(node)
    return None if meta is None else meta.dtype


def scaled_query(site: AttentionSite, build: NodeBuilder) -> tuple[fx.Node, float]:
    """q and the float scale for SDPA. Symbolic or 0-d tensor factors are applied to q in the graph."""
    constant = site.constant_scale
    q = site.q
    for factor, divide in site.scale_factors:
        q = build.call(operator.truediv if divide else operator.mul, q, factor)
    return q, float(constant)


def additive_mask(site: AttentionSite, build: NodeBuilder) -> fx.Node | None:
    """The site's mask operations as one additive float mask M with softmax(s*c + M) == the original.

    Scale ops after a mask also scale the mask accumulated so far; `masked_fill(cond, v)` becomes
    `where(cond, v, M)`. Built from the mask tensors only (their own broadcast shape, never [B,H,L,S]
    unless the mask already was).
    """
    acc: Any = None
    for op in site.mask_ops:
        if op.kind == "scale":
            if acc is not None:
                acc = build.call(operator.truediv if op.divide else operator.mul, acc, op.value)
        elif op.kind == "add":
            if is_number(op.tensor):
                continue  # a constant shift of every score cancels in the softmax
            term = op.tensor
            if op.value is not None and op.value != 1:
                term = build.call(operator.mul, term, op.value)  # baddbmm's beta
            acc = term if acc is None else build.call(operator.add, acc, term)
        elif op.kind == "fill":
            acc = build.call(torch.where, op.tensor, op.value, 0.0 if acc is None else acc)
        elif op.kind == "keep":
            acc = build.call(torch.where, op.tensor, 0.0 if acc is None else acc, op.value)
    if acc is None:
        return None
    dtype = _dtype(site.q)
    if _dtype(acc) != dtype:
        acc = build.method("to", acc, dtype)
    return acc


def dropout_probability(site: AttentionSite) -> Any:
    """The dropout probability the site applies to its weights: 0.0 where an eager chain's dropout is off
    (`training=False`), else its `p` (a number, or a node when Dynamo passes it as a run-time value)."""
    if site.form == "eager" and site.dropout_training is False:
        return 0.0
    return site.dropout_p


def dropout_active(site: AttentionSite) -> bool:
    """Whether dropout may drop attention weights at this site (a p that is not the constant 0)."""
    p = dropout_probability(site)
    return not (is_number(p) and p == 0)


def sdpa_dropout_p(site: AttentionSite) -> Any:
    if isinstance(site.dropout_training, fx.Node):
        raise RewriteError("dropout's `training` flag is computed in the graph")
    return dropout_probability(site) if site.dropout_training else 0.0


def _erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the replaced chain, then any pure node that became unused because of it (last first)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chain = set(nodes)
    pending = set(n for n in nodes if n in order)
    while pending:
        node = max(pending, key=order.__getitem__)
        pending.discard(node)
        if node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node not in chain and not may_erase_unused(node):  # (in-place and random ops stay)
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        pending.update(i for i in inputs if i.op in ("call_function", "call_method") and not i.users)


def rewrite_exact(gm: fx.GraphModule, site: AttentionSite, fake_mode) -> str:
    """Rewrite one site to a fused SDPA call (is_causal=True for causal masks). Returns a description."""
    if site.form == "sdpa":
        return _tighten_sdpa(gm, site)
    if site.score_transform:  # SDPA would compute softmax(s) without it: never drop a transform
        raise RewriteError(f"the scores pass through a transform SDPA cannot apply: {site.score_transform}")
    build = NodeBuilder(gm, site.output, fake_mode, source=site.anchor)
    dropout_p = sdpa_dropout_p(site)
    q, scale = scaled_query(site, build)
    causal = site.mask.kind == "causal"
    mask = None if causal else additive_mask(site, build)
    nan_rows = None
    if mask is not None and site.mask.empty_rows_possible:
        q, mask, nan_rows = _eager_empty_rows(q, mask, build)
    kwargs = {"attn_mask": mask, "dropout_p": dropout_p, "is_causal": causal, "scale": scale}
    out = build.call(SDPA, q, site.k, site.v, **kwargs)
    if nan_rows is not None:
        out = build.call(operator.add, out, build.method("to", nan_rows, _dtype(out)))
    replace_output(gm, site, out, build)
    return "sdpa(is_causal=True)" if causal else ("sdpa(attn_mask)" if mask is not None else "sdpa")


def replace_output(gm: fx.GraphModule, site: AttentionSite, out: fx.Node, build: NodeBuilder) -> None:
    """Route the site's users to `out` (merged back to the output's layout when the site was split to a finer
    one, cast back to the original output dtype) and erase the old chain."""
    for step in site.output_layout:
        out = build.method(step[0], out, *step[1:])
    want = _dtype(site.output)
    if want is not None and _dtype(out) != want:
        out = build.method("to", out, want)
    old = site.output
    old.replace_all_uses_with(out)
    _erase_dead(gm, site.chain + [old])
    site.output = out


def _eager_empty_rows(q: fx.Node, mask: fx.Node, build: NodeBuilder) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Rows whose every key is masked (mask < BLOCKED_BELOW everywhere): eager's softmax sees equal values there
    (s + finfo.min rounds to finfo.min) and gives the mean of the values at the keys with the row's largest
    mask value, or NaN when that is -inf. SDPA gets those rows wrong (CPU: 0 for -inf, and for finfo.min a
    backward that sums instead of averaging), so such a row is given a mask of 0 at those keys (-inf
    elsewhere) and a query of 0: SDPA then computes the mean itself, and the gradient reaches v, not q or k
    (the row's value does not depend on them). Returns (q, mask, NaN-or-0 per row to add to the output).

    Added only when the mask is not proved to leave every query a key (data-dependent masks); mask-sized
    work, never scores-sized."""
    top = build.method("amax", mask, -1, keepdim=True)
    empty = build.call(operator.lt, top, BLOCKED_BELOW)
    at_top = build.call(torch.where, build.call(operator.eq, mask, top), 0.0, float("-inf"))
    mask = build.call(torch.where, empty, build.method("to", at_top, _dtype(mask)), mask)
    q = build.method("masked_fill", q, empty, 0.0)
    nan_rows = build.call(torch.where, build.call(torch.isneginf, top), float("nan"), 0.0)
    return q, mask, nan_rows


def _tighten_sdpa(gm: fx.GraphModule, site: AttentionSite) -> str:
    """An SDPA call whose explicit mask is exactly causal gets `is_causal=True` and no mask."""
    node = site.output
    if site.mask.kind == "causal" and site.sdpa_mask is not None and not site.is_causal_flag:
        q_shape, k_shape = tensor_meta(site.q).shape, tensor_meta(site.k).shape
        if q_shape[-2] == k_shape[-2]:
            old_mask = site.sdpa_mask
            args = list(node.args)
            kwargs = dict(node.kwargs)
            if len(args) > 3:
                args[3] = None
            kwargs["attn_mask"] = None
            if len(args) > 5:
                args[5] = True
            else:
                kwargs["is_causal"] = True
            node.args, node.kwargs = tuple(args), kwargs
            site.sdpa_mask, site.is_causal_flag = None, True
            if isinstance(old_mask, fx.Node):
                _erase_dead(gm, [old_mask] if not old_mask.users else [])
            return "sdpa(is_causal=True), explicit causal mask dropped"
    return "sdpa (already fused, unchanged)"


def finalize(gm: fx.GraphModule) -> None:
    """Erase the matcher's layout conversions nothing reads (sites kept as written), then lint and recompile."""
    for node in reversed(list(gm.graph.nodes)):
        if node.meta.get("almostlinear_inserted") and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
