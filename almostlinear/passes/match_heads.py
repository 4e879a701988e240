"""Key/value heads shared by several query heads: a grouped-query repeat (`repeated_kv`, `grouped_kv`), a
multi-query broadcast (`broadcast_kv_heads`); and ALiBi slopes brought to one per head (`per_head_alibi`)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_utils import arg, concrete_int, is_call, ndim_of, normalize_dim, shape_of
from .mask_ops import MaskContext
from .match_layout import LayoutInserter
from .site import AttentionSite


def _repeat_interleaved(node: fx.Node) -> tuple[fx.Node, int] | None:
    """`x.repeat_interleave(n, dim=1)` of a 4-d x (older GQA code)."""
    groups, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    base = node.args[0]
    if isinstance(groups, int) and normalize_dim(dim, ndim_of(base)) == 1 and ndim_of(base) == 4:
        return base, groups
    return None


def _unsqueezed_at_2(inner: fx.Node) -> fx.Node | None:
    """x of `x[:, :, None]` or `x.unsqueeze(2)` (before a 5-d expand)."""
    if is_call(inner, operator.getitem) and isinstance(inner.args[1], tuple):
        index = inner.args[1]
        if len(index) >= 3 and index[2] is None and all(i == slice(None) for i in index[:2]):
            return inner.args[0]
    elif is_call(inner, "unsqueeze", torch.unsqueeze) and normalize_dim(inner.args[1], 5) == 2:
        return inner.args[0]
    return None


def repeated_kv(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(unrepeated k or v [B, Hk, S, D], groups) when `node` repeats kv heads for grouped-query attention.

    HF `repeat_kv`: x[:, :, None, :, :].expand(B, Hk, n, S, D).reshape(B, Hk * n, S, D);
    `x.repeat_interleave(n, dim=1)` (older GQA code).
    """
    if is_call(node, "repeat_interleave", torch.repeat_interleave):
        return _repeat_interleaved(node)
    if not is_call(node, "reshape", "view", torch.reshape):
        return None
    expand = node.args[0]
    if not is_call(expand, "expand") or len(shape_of(expand) or ()) != 5:
        return None
    base = _unsqueezed_at_2(expand.args[0])
    shape = shape_of(expand)
    if base is None or ndim_of(base) != 4 or shape_of(node) is None:
        return None
    try:
        groups = int(shape[2])
        if tuple(shape_of(node)) != (shape[0], shape[1] * shape[2], shape[3], shape[4]):
            return None
    except (TypeError, ValueError):
        return None
    return base, groups


def grouped_kv(site: AttentionSite) -> None:
    """k and v both repeated over the same number of groups: record the groups and the unrepeated k, v."""
    k, v = repeated_kv(site.k), repeated_kv(site.v)
    if k is not None and v is not None and k[1] == v[1]:
        site.gqa_groups = k[1]
        site.kv_unrepeated = (k[0], v[0])


def broadcast_kv_heads(site: AttentionSite, gm: fx.GraphModule, ctx: MaskContext) -> None:
    """Multi-query attention written as a broadcasting matmul (Falcon: q [B, H, L, D] @ k [B, 1, D, S]): the
    site reads k and v expanded over the heads (a view), and the polynomial op the unexpanded ones (GQA)."""
    q, k, v = (shape_of(n) for n in (site.q, site.k, site.v))
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) == 4):
        return
    heads = concrete_int(q[1])
    if heads is None or heads == 1 or concrete_int(k[1]) != 1 or concrete_int(v[1]) != 1:
        return
    if concrete_int(q[0]) != concrete_int(k[0]) or concrete_int(k[0]) != concrete_int(v[0]):
        return
    inserter = LayoutInserter(gm, ctx, site)
    size = inserter.size(q[1])
    if size is None:
        return
    site.kv_broadcast = (site.k, site.v)
    site.k = inserter.method("expand", (site.k, -1, size, -1, -1))
    site.v = inserter.method("expand", (site.v, -1, size, -1, -1))


def per_head_alibi(site: AttentionSite) -> None:
    """ALiBi slopes of a bias split from [B*H, 1, S] come per (batch, head): one per head when they repeat
    over the batch (the polynomial op takes [H] slopes)."""
    slopes, q = site.mask.alibi_slopes, shape_of(site.q)
    if not slopes or q is None or len(q) != 4:
        return
    try:
        batch, heads = int(q[0]), int(q[1])
    except (TypeError, ValueError):
        return
    if len(slopes) == batch * heads and batch > 1:
        rows = [slopes[b * heads:(b + 1) * heads] for b in range(batch)]
        if all(all(abs(x - y) <= 1e-6 * (1 + abs(y)) for x, y in zip(row, rows[0])) for row in rows):
            site.mask.alibi_slopes = list(rows[0])
