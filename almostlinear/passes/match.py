"""Find attention sites by structure: softmax(scale * q k^T + mask) [dropout] v, and SDPA calls.

The matcher runs on a normalized graph (see `normalize`). From every softmax it walks *up* through the
operations a score may pass through (scale, masks, dtype casts) to the score matmul, and *down* through
casts and dropout to the matmul with the values. Each step is a small rule; a step that fails records a
near-miss with its reason, so every softmax that is not rewritten is explained in the report.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import masks as mask_analysis
from .graph_utils import (
    arg,
    example_value,
    is_call,
    is_number,
    ndim_of,
    normalize_dim,
    placeholder_kinds,
    shape_of,
    single_user,
    tensor_meta,
    to_networkx,
)
from .masks import MaskOp, MaskSpec
from .normalize import DROPOUT, MASKED_FILL, MATMUL, SOFTMAX, TRANSPOSE, WHERE

SDPA = F.scaled_dot_product_attention


@dataclass
class AttentionSite:
    """One attention computation in the graph. Shapes follow the graph's layout: [..., T, D]."""

    id: int
    form: str  # "eager" (matmul-softmax chain) or "sdpa"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node  # the node whose value is the attention output
    softmax: fx.Node | None = None
    chain: list[fx.Node] = field(default_factory=list)  # nodes replaced by the rewrite (eager form)
    mask_ops: list[MaskOp] = field(default_factory=list)
    scale: Any = 1.0  # total multiplicative factor on q.k: float, or a graph node (symbolic / 0-d tensor)
    scale_factors: list = field(default_factory=list)  # (factor, divide) pairs in graph order
    prescale: float = 1.0  # constant factors found on q and k before the matmul (report only)
    mask: MaskSpec = field(default_factory=MaskSpec)
    sdpa_mask: Any = None  # attn_mask of an SDPA call
    is_causal_flag: bool = False  # is_causal of an SDPA call
    dropout_p: Any = 0.0
    dropout_training: Any = True
    enable_gqa: bool = False
    gqa_groups: int = 1
    softmax_dtype: Any = None
    residual: fx.Node | None = None

    @property
    def anchor(self) -> fx.Node:
        return self.softmax if self.softmax is not None else self.output

    @property
    def effective_scale(self) -> float | None:
        if isinstance(self.scale, (int, float)):
            return float(self.scale) * self.prescale
        return None


@dataclass
class NearMiss:
    node: fx.Node
    reason: str


class NotAttention(Exception):
    """A rule failed; the message is the near-miss reason shown in the report."""


# ---------------------------------------------------------------------------------------------------
# Small rules
# ---------------------------------------------------------------------------------------------------


def _is_cast(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_method"
        and node.target == "to"
        and len(node.args) == 2
        and isinstance(node.args[1], torch.dtype)
        and not node.kwargs
    )


def _is_scalar(value: Any) -> bool:
    if is_number(value):
        return True
    if isinstance(value, fx.Node):
        ev = example_value(value)
        if isinstance(ev, (torch.SymFloat, torch.SymInt, float, int)):
            return True
        return isinstance(ev, torch.Tensor) and ev.dim() == 0
    return False


def _last_two_dims_swapped(node: fx.Node) -> bool:
    if not is_call(node, TRANSPOSE):
        return False
    ndim = ndim_of(node.args[0])
    dims = {normalize_dim(node.args[1], ndim), normalize_dim(node.args[2], ndim)}
    return ndim is not None and ndim >= 2 and dims == {ndim - 2, ndim - 1}


_EINSUM_SPEC = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _einsum_operands(node: fx.Node) -> tuple[str, list] | None:
    if not is_call(node, torch.einsum) or not node.args or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    return node.args[0].replace(" ", ""), operands


def _einsum_scores(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`einsum("bhqd,bhkd->bhqk", q, k)`: batch letters shared, d contracted, output batch+q+k."""
    parsed = _einsum_operands(node)
    if parsed is None or len(parsed[1]) != 2:
        return None
    m = _EINSUM_SPEC.match(parsed[0])
    if not m or "." in parsed[0]:
        return None
    a, b, out = m.groups()
    if len(a) < 2 or len(a) != len(b) or len(out) != len(a):
        return None
    batch, qi, d = a[:-2], a[-2], a[-1]
    if b[:-2] != batch or b[-1] != d or out != batch + qi + b[-2] or len(set(a + b[-2])) != len(a) + 1:
        return None
    return parsed[1][0], parsed[1][1]


def _einsum_values(node: fx.Node, weights: fx.Node) -> fx.Node | None:
    """`einsum("bhqk,bhkd->bhqd", weights, v)`."""
    parsed = _einsum_operands(node)
    if parsed is None or len(parsed[1]) != 2 or parsed[1][0] is not weights:
        return None
    m = _EINSUM_SPEC.match(parsed[0])
    if not m:
        return None
    w, v, out = m.groups()
    if len(w) < 2 or len(v) != len(w) or len(out) != len(w):
        return None
    batch, qi, ki = w[:-2], w[-2], w[-1]
    if v[:-2] != batch or v[-2] != ki or out != batch + qi + v[-1] or v[-1] in w:
        return None
    return parsed[1][1]


def _peel_constant_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """q = q0 * c (or / c) with a Python constant c: report the factor (the graph keeps it)."""
    factor = 1.0
    while is_call(node, operator.mul, operator.truediv) and len(node.users) >= 1:
        a, b = node.args
        if isinstance(a, fx.Node) and is_number(b):
            factor *= (1.0 / b) if node.target is operator.truediv else float(b)
            node = a
        elif isinstance(b, fx.Node) and is_number(a) and node.target is operator.mul:
            factor *= float(a)
            node = b
        else:
            break
    return node, factor


# ---------------------------------------------------------------------------------------------------
# Walking up from the softmax: scale, masks and casts, down to the score matmul
# ---------------------------------------------------------------------------------------------------


def _score_step(node: fx.Node, site: AttentionSite) -> fx.Node | None:
    """One op between the score matmul and the softmax; returns its score operand, or None at the matmul."""
    if is_call(node, MATMUL):
        return None
    if _is_cast(node):
        return node.args[0]
    if is_call(node, operator.mul, operator.truediv):
        a, b = node.args
        divide = node.target is operator.truediv
        if isinstance(a, fx.Node) and _is_scalar(b) and not (divide and isinstance(a, fx.Node) and _is_scalar(a)):
            site.mask_ops.append(MaskOp("scale", node, value=b, divide=divide))
            return a
        if not divide and isinstance(b, fx.Node) and _is_scalar(a):
            site.mask_ops.append(MaskOp("scale", node, value=a))
            return b
        raise NotAttention(f"scores {'divided' if divide else 'multiplied'} by a tensor that is not a scalar")
    if is_call(node, operator.add):
        a, b = node.args
        scores, term = (a, b) if _came_from_matmul(a) else (b, a)
        if not isinstance(term, fx.Node) and not is_number(term):
            raise NotAttention("scores added to an unsupported value")
        if is_number(term):  # a constant shift cancels in the softmax; keep it as a (trivial) add
            site.mask_ops.append(MaskOp("add", node, tensor=term))
            return scores
        site.mask_ops.append(MaskOp("add", node, tensor=term))
        return scores
    if is_call(node, MASKED_FILL):
        scores, cond, value = node.args
        site.mask_ops.append(MaskOp("fill", node, tensor=cond, value=value))
        return scores
    if is_call(node, WHERE) and len(node.args) == 3:
        cond, a, b = node.args
        if _came_from_matmul(a) and not _came_from_matmul(b):
            site.mask_ops.append(MaskOp("keep", node, tensor=cond, value=b))
            return a
        if _came_from_matmul(b) and not _came_from_matmul(a):
            site.mask_ops.append(MaskOp("fill", node, tensor=cond, value=a))
            return b
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    raise NotAttention(f"scores are transformed by `{name}` before the softmax (not plain attention)")


def _came_from_matmul(node: Any, depth: int = 16) -> bool:
    """Whether `node` is on the score path: reaches a score matmul through score-preserving ops only
    (casts, scale multiplications/divisions, mask additions, masked_fill, the kept branch of a where)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if is_call(node, MATMUL) or _einsum_scores(node) is not None:
        return True
    if _is_cast(node) or is_call(node, operator.truediv, MASKED_FILL):  # scores / c, scores.masked_fill(..)
        operands = node.args[:1]
    elif is_call(node, operator.mul, operator.add):  # either side: c * scores, bias + scores
        operands = node.args[:2]
    elif is_call(node, WHERE):  # where(mask, scores, fill) or where(mask, fill, scores)
        operands = node.args[1:3]
    else:
        return False
    return any(_came_from_matmul(x, depth - 1) for x in operands)


def _match_scores(softmax: fx.Node, site: AttentionSite) -> None:
    node = softmax.args[0]
    chain = []
    while True:
        if not isinstance(node, fx.Node):
            raise NotAttention("softmax input is not a tensor computed in the graph")
        if len(node.users) != 1:
            raise NotAttention("scores are used outside the site")
        chain.append(node)
        einsum = _einsum_scores(node)
        if einsum is not None:
            site.q, site.k = einsum
            break
        baddbmm = is_call(node, torch.baddbmm, "baddbmm")
        if baddbmm:  # BLOOM-style scores: alibi.baddbmm(q, k^T, beta=beta, alpha=scale)
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if not (is_number(beta) and is_number(alpha)) or len(node.args) != 3:
                raise NotAttention("baddbmm with non-constant beta/alpha")
            if beta != 0:
                site.mask_ops.append(MaskOp("add", node, tensor=node.args[0], value=float(beta)))
            site.mask_ops.append(MaskOp("scale", node, value=float(alpha)))
        upstream = None if baddbmm else _score_step(node, site)
        if upstream is None:  # the score matmul
            a, b = node.args[1:] if baddbmm else node.args
            if not isinstance(b, fx.Node) or not _last_two_dims_swapped(b):
                desc = b.format_node() if isinstance(b, fx.Node) else repr(b)
                raise NotAttention(f"key operand is not a swap of the last two dims ({desc[:80]})")
            site.q, site.k = a, b.args[0]
            if len(b.users) == 1:
                chain.append(b)
            break
        node = upstream
    site.mask_ops.reverse()  # graph order: first applied first
    site.chain.extend(chain)


def _match_values(softmax: fx.Node, site: AttentionSite) -> None:
    node = softmax
    while True:
        user = single_user(node)
        if user is None:
            raise NotAttention("attention weights are used outside the site")
        if _is_cast(user):
            node = user
            site.chain.append(user)
            continue
        if is_call(user, DROPOUT) and user.args[0] is node:
            if site.dropout_p not in (0.0, None) and site.dropout_p != 0:
                raise NotAttention("two dropouts on the attention weights")
            site.dropout_p, site.dropout_training = user.args[1], user.args[2]
            site.chain.append(user)
            node = user
            continue
        if is_call(user, MATMUL) and user.args[0] is node:
            site.v, site.output = user.args[1], user
            return
        v = _einsum_values(user, node)
        if v is not None:
            site.v, site.output = v, user
            return
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
        raise NotAttention(f"attention weights feed `{name}`, not a matmul with values")


def _check_shapes(site: AttentionSite) -> None:
    q, k, v = (shape_of(n) for n in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        raise NotAttention("q, k or v has no tensor shape")
    if not (len(q) == len(k) == len(v)) or len(q) < 2:
        raise NotAttention(f"q, k, v ranks differ ({len(q)}, {len(k)}, {len(v)})")
    if q[-1] != k[-1] or k[-2] != v[-2]:
        raise NotAttention("head dims of q/k or lengths of k/v differ")
    if tuple(q[:-2]) != tuple(k[:-2]) or tuple(k[:-2]) != tuple(v[:-2]):
        raise NotAttention("q, k, v batch dims differ (broadcasting matmul)")
    dtypes = {tensor_meta(n).dtype for n in (site.q, site.k, site.v)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise NotAttention(f"q, k, v dtypes are not one floating dtype ({sorted(map(str, dtypes))})")


def repeated_kv(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(unrepeated k or v [B, Hk, S, D], groups) when `node` repeats kv heads for grouped-query attention.

    HF `repeat_kv`: x[:, :, None, :, :].expand(B, Hk, n, S, D).reshape(B, Hk * n, S, D);
    `x.repeat_interleave(n, dim=1)` (older GQA code).
    """
    if is_call(node, "repeat_interleave", torch.repeat_interleave):
        groups, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        base = node.args[0]
        if isinstance(groups, int) and normalize_dim(dim, ndim_of(base)) == 1 and ndim_of(base) == 4:
            return base, groups
        return None
    if not is_call(node, "reshape", "view", torch.reshape):
        return None
    expand = node.args[0]
    if not is_call(expand, "expand") or len(shape_of(expand) or ()) != 5:
        return None
    inner = expand.args[0]
    base = None
    if is_call(inner, operator.getitem) and isinstance(inner.args[1], tuple):
        index = inner.args[1]
        if len(index) >= 3 and index[2] is None and all(i == slice(None) for i in index[:2]):
            base = inner.args[0]
    elif is_call(inner, "unsqueeze", torch.unsqueeze) and normalize_dim(inner.args[1], 5) == 2:
        base = inner.args[0]
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


def _gqa(site: AttentionSite) -> None:
    k, v = repeated_kv(site.k), repeated_kv(site.v)
    if k is not None and v is not None and k[1] == v[1]:
        site.gqa_groups = k[1]
        site.kv_unrepeated = (k[0], v[0])  # type: ignore[attr-defined]


def _total_scale(site: AttentionSite) -> None:
    constant, symbolic = 1.0, []
    for op in site.mask_ops:
        if op.kind != "scale":
            continue
        if is_number(op.value):
            constant = constant / op.value if op.divide else constant * op.value
        else:
            symbolic.append((op.value, op.divide))
    site.scale_factors = symbolic
    site.scale = constant if not symbolic else None
    site._constant_scale = constant  # type: ignore[attr-defined]
    _, fq = _peel_constant_scale(site.q)
    _, fk = _peel_constant_scale(site.k)
    site.prescale = fq * fk


def _match_eager(softmax: fx.Node, site: AttentionSite) -> None:
    x = softmax.args[0]
    ndim = ndim_of(x)
    dim = normalize_dim(softmax.args[1], ndim)
    if dim is None or dim != ndim - 1:
        raise NotAttention(f"softmax over dim {softmax.args[1]} (not the last)")
    site.softmax_dtype = softmax.kwargs.get("dtype")
    site.chain.append(softmax)
    _match_values(softmax, site)
    _match_scores(softmax, site)
    _check_shapes(site)
    _total_scale(site)
    _gqa(site)


def _match_sdpa(node: fx.Node, site: AttentionSite) -> None:
    site.q, site.k, site.v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    site.sdpa_mask = arg(node, 3, "attn_mask")
    site.dropout_p = arg(node, 4, "dropout_p", 0.0)
    site.is_causal_flag = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    site.enable_gqa = bool(arg(node, 7, "enable_gqa", False))
    q_shape, k_shape = shape_of(site.q), shape_of(site.k)
    if scale is None and q_shape is not None:
        head_dim = q_shape[-1]
        scale = 1.0 / float(head_dim) ** 0.5 if isinstance(head_dim, int) else None
    site.scale = scale if is_number(scale) or scale is None else scale
    if site.enable_gqa and q_shape and k_shape and len(q_shape) >= 3:
        try:
            site.gqa_groups = int(q_shape[-3]) // int(k_shape[-3])
        except (TypeError, ValueError, ZeroDivisionError):
            site.gqa_groups = 1
    elif isinstance(site.k, fx.Node) and isinstance(site.v, fx.Node):
        _gqa(site)
    site.output = node


# ---------------------------------------------------------------------------------------------------
# Residual connection: output -> (layout ops) -> linear -> [dropout] -> add
# ---------------------------------------------------------------------------------------------------

_LAYOUT_METHODS = ("transpose", "permute", "reshape", "view", "contiguous", "flatten", "to")
_LAYOUT_FUNCTIONS = (TRANSPOSE, torch.reshape, torch.flatten, torch.permute)


def _find_residual(output: fx.Node, depth: int = 8) -> fx.Node | None:
    node, seen_linear = output, False
    for _ in range(depth):
        user = single_user(node)
        if user is None:
            return None
        if is_call(user, operator.add, torch.add, operator.iadd):
            return user if seen_linear else None
        if is_call(user, torch._C._nn.linear, F.linear):
            seen_linear = True
        elif not (is_call(user, *_LAYOUT_METHODS) or is_call(user, *_LAYOUT_FUNCTIONS) or is_call(user, DROPOUT)):
            return None
        node = user
    return None


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def find_sites(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[AttentionSite], list[NearMiss]]:
    """All attention sites of a normalized graph, with their masks classified, and the near-misses."""
    graph = to_networkx(gm)
    ctx = mask_analysis._Context(gm, graph, placeholder_kinds(gm, example_inputs), example_inputs)
    sites: list[AttentionSite] = []
    misses: list[NearMiss] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        form = "eager" if is_call(node, SOFTMAX) else "sdpa" if is_call(node, SDPA) else None
        if form is None or node in claimed:
            continue
        site = AttentionSite(id=len(sites), form=form, q=node, k=node, v=node, output=node)
        try:
            if form == "eager":
                _match_eager(node, site)
                site.mask = mask_analysis.analyze(site.mask_ops, shape_of(node.args[0]), ctx)
            else:
                _match_sdpa(node, site)
                site.mask = _sdpa_mask(site, ctx)
        except NotAttention as exc:
            misses.append(NearMiss(node, str(exc)))
            continue
        site.residual = _find_residual(site.output)
        claimed.update(site.chain)
        sites.append(site)
    for node in gm.graph.nodes:  # softmax-like ops that are never attention, for the near-miss list
        if is_call(node, torch.log_softmax, F.log_softmax, "log_softmax"):
            misses.append(NearMiss(node, "log_softmax is not attention"))
    return sites, misses


def _sdpa_mask(site: AttentionSite, ctx) -> MaskSpec:
    ops = []
    mask = site.sdpa_mask
    if isinstance(mask, fx.Node):
        meta = tensor_meta(mask)
        if meta is not None and meta.dtype == torch.bool:
            ops.append(MaskOp("keep", mask, tensor=mask, value=float("-inf")))
        else:
            ops.append(MaskOp("add", mask, tensor=mask))
    q, k = shape_of(site.q), shape_of(site.k)
    scores_shape = None if q is None or k is None else tuple(q[:-1]) + (k[-2],)
    spec = mask_analysis.analyze(ops, scores_shape, ctx)
    if site.is_causal_flag:
        if spec.kind == "none":
            return MaskSpec(kind="causal", causal=True, reason="is_causal=True")
        if spec.kind in ("causal", "key_padding", "causal+key_padding"):
            spec.kind = "causal+key_padding" if "key_padding" in spec.kind else "causal"
            spec.causal = True
            return spec
        return MaskSpec(kind="dense", reason="is_causal combined with a non-causal mask")
    return spec
