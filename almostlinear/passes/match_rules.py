"""The small rules the matcher's walks share: recognising one op (a cast, a scalar, a per-head factor, a key
transpose, baddbmm, a layout step) and describing a node in a near-miss reason."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from .graph_utils import arg, example_value, is_call, is_number, is_pure, ndim_of, normalize_dim, tensor_meta
from .normalize import TRANSPOSE


def is_cast(node: Any) -> bool:
    """`x.to(dtype)` (normalize writes every dtype cast so)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_method"
        and node.target == "to"
        and len(node.args) == 2
        and isinstance(node.args[1], torch.dtype)
        and not node.kwargs
    )


def is_scalar(value: Any) -> bool:
    """A number, or a node whose value is a symbolic number or a 0-d tensor."""
    if is_number(value):
        return True
    if isinstance(value, fx.Node):
        ev = example_value(value)
        if isinstance(ev, (torch.SymFloat, torch.SymInt, float, int)):
            return True
        return isinstance(ev, torch.Tensor) and ev.dim() == 0
    return False


def per_head_factor(value: Any) -> bool:
    """A tensor whose last two dims are 1 ([H, 1, 1], [1, H, 1, 1]): one factor per head, the same for every
    query and key (a learned temperature; cosine attention's exp(logit_scale))."""
    shape = tensor_meta(value).shape if isinstance(value, fx.Node) and tensor_meta(value) is not None else None
    return shape is not None and len(shape) >= 2 and shape[-1] == 1 and shape[-2] == 1 and (
        tensor_meta(value).dtype.is_floating_point)


def last_two_dims_swapped(node: Any) -> bool:
    if not is_call(node, TRANSPOSE):
        return False
    ndim = ndim_of(node.args[0])
    dims = {normalize_dim(node.args[1], ndim), normalize_dim(node.args[2], ndim)}
    return ndim is not None and ndim >= 2 and dims == {ndim - 2, ndim - 1}


# ---------------------------------------------------------------------------------------------------
# Score products written as baddbmm (einsum: match_einsum)
# ---------------------------------------------------------------------------------------------------


def baddbmm_operands(node: fx.Node) -> tuple | None:
    """(input, batch1, batch2, beta, alpha) of `torch.baddbmm(input, b1, b2, beta=, alpha=)` or
    `input.baddbmm(b1, b2, ...)` (batch1/batch2 given positionally or by keyword, as BLOOM does)."""
    if not is_call(node, torch.baddbmm, "baddbmm") or not node.args:
        return None
    return (node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2"), node.kwargs.get("beta", 1),
            node.kwargs.get("alpha", 1))


# ---------------------------------------------------------------------------------------------------
# Layout steps: reshapes that keep the (query, key) axes
# ---------------------------------------------------------------------------------------------------

_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "contiguous")
_RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.unflatten)


def same_size(a: Any, b: Any) -> bool:
    """Sizes known equal without adding guards (ints, or SymInts whose expressions are provably equal)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - sizes that cannot be compared are not known equal
        return False


def same_sizes(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def is_layout_step(node: Any) -> bool:
    """A view/reshape/flatten/unflatten/contiguous that keeps the last two dims and the dtype. Such a reshape
    only splits or merges the leading (batch, head) dims: every [L, S] matrix is kept whole, in row-major
    order, so attention computed per matrix commutes with it."""
    if not (is_call(node, *_RESHAPE_METHODS) or is_call(node, *_RESHAPE_FUNCTIONS)) or not node.args:
        return False
    x = node.args[0]
    a, b = tensor_meta(x), tensor_meta(node)
    if a is None or b is None or a.dim() < 2 or b.dim() < 2 or a.dtype != b.dtype:
        return False  # (x.view(dtype) reinterprets the bits: not a layout step)
    return same_sizes(tuple(a.shape[-2:]), tuple(b.shape[-2:]))


def layout_ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and the tensors it was reshaped from by layout steps (q3 = q4.reshape(B*H, L, D) -> [q3, q4])."""
    found = [node]
    while is_layout_step(found[-1]) and isinstance(found[-1].args[0], fx.Node):
        found.append(found[-1].args[0])
    return found


# ---------------------------------------------------------------------------------------------------
# Near-miss descriptions
# ---------------------------------------------------------------------------------------------------


def op_name(node: fx.Node) -> str:
    """The method name or the function's `__name__` a node calls."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _reader_name(node: fx.Node) -> str:
    return "the graph output" if node.op == "output" else f"`{op_name(node)}`"


def _where_it_leads(user: fx.Node) -> str:
    """Why a reader of a site's tensor stays: it reaches a graph output or an in-place op, or is impure."""
    seen, stack = set(), [user]
    while stack:
        current = stack.pop()
        if current in seen or len(seen) > 64:
            continue
        seen.add(current)
        if current.op == "output":
            return "a graph output (returned, or stored on a module/global)"
        if current.op == "call_method" and str(current.target).endswith("_"):
            return f"the in-place `{current.target}` (side effects are never removed)"
        stack.extend(current.users)
    if user.op != "output" and not is_pure(user):
        return "kept although unused: not known to be free of side effects (random, in-place, ...)"
    return ""


def other_uses(node: fx.Node, keep: fx.Node | None) -> str:
    """The uses of `node` besides `keep`, described for a near-miss: each reader, and where it leads (a graph
    output, i.e. a returned value or one Dynamo stores back on a module; or an in-place op)."""
    parts = []
    for user in node.users:
        if user is keep:
            continue
        reaches = _where_it_leads(user)
        parts.append(_reader_name(user) + (f" -> {reaches}" if reaches and user.op != "output" else ""))
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")
