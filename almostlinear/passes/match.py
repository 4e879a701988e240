"""Find attention sites by structure: softmax(scale * q k^T + mask) [dropout] v, and SDPA calls.

The matcher runs on a normalized graph (see `normalize`). From every softmax it walks *up* through the
operations a score may pass through (scale, masks, dtype casts) to the score matmul, and *down* through
casts and dropout to the matmul with the values. Each step is a small rule; a step that fails records a
near-miss with its reason, so every softmax that is not rewritten is explained in the report.

Three things are seen through on the way:

* layout changes: a `view`/`reshape`/`flatten`/`unflatten` of the scores or the weights that keeps the
  (query, key) axes only splits or merges the leading batch/head dims (BLOOM: scores by `baddbmm` over
  [B*H, L, S], viewed as [B, H, L, S] for the mask, weights viewed back for `bmm`). The site is then put in
  one layout, the finest one on its path ([B, H, L, S]): q, k, v and every mask tensor are split to it (a
  reshape they came from is peeled off instead), and the rewrite merges the output back to the layout the
  graph expects (`AttentionSite.output_layout`);
* known score transforms the fused ops cannot apply: a soft-cap `tanh(s / c) * c` (Gemma-2, Grok) or a
  `clamp`. The site is recorded with `score_transform` set (its masks are those applied after the transform)
  and the planner keeps it as written;
* dead uses: `normalize` erases introspection copies nothing reads; a use that remains (a graph output: a
  returned or stored copy) is named in the near-miss reason.
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
    annotate,
    arg,
    concrete_int,
    example_value,
    fake_mode_of,
    fake_value,
    is_call,
    is_number,
    is_pure,
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
    kv_broadcast: tuple | None = None  # (k, v) [B, 1, S, D] of a broadcasting multi-query site
    kv_unrepeated: tuple | None = None  # (k, v) [B, Hk, S, D] before a GQA repeat / MQA broadcast, if any
    constant_scale: float = 1.0  # the constant part of the factor on q.k (symbolic factors: scale_factors)
    score_transform: str = ""  # a transform of the scores the fused ops cannot apply (soft-cap): kept as written
    pre_transform_ops: list[MaskOp] = field(default_factory=list)  # ops before that transform (graph order)
    transform_at: int | None = None  # (while walking up) how many mask ops were recorded after the transform
    cap_nodes: set = field(default_factory=set, repr=False)  # the soft-cap's own scale nodes (not the scale)
    output_layout: list = field(default_factory=list)  # ("flatten", start, end) | ("unsqueeze", dim): site -> graph
    inserted: list[fx.Node] = field(default_factory=list)  # nodes the matcher added (layout conversions)

    @property
    def anchor(self) -> fx.Node:
        return self.softmax if self.softmax is not None else self.output

    @property
    def effective_scale(self) -> float | None:
        if isinstance(self.scale, (int, float)):
            return float(self.scale) * self.prescale
        return None

    @property
    def op_kv(self) -> tuple[fx.Node, fx.Node]:
        """The k and v the polynomial op reads: unrepeated over GQA groups where the matcher found them."""
        return self.kv_unrepeated or (self.k, self.v)


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
# Layout steps: reshapes of the scores or weights that keep the (query, key) axes
# ---------------------------------------------------------------------------------------------------

_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "contiguous")
_RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.unflatten)


def _same_size(a: Any, b: Any) -> bool:
    """Sizes known equal without adding guards (ints, or SymInts whose expressions are provably equal)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - sizes that cannot be compared are not known equal
        return False


def _same_sizes(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b))


def _is_layout_step(node: Any) -> bool:
    """A view/reshape/flatten/unflatten/contiguous that keeps the last two dims and the dtype. Such a reshape
    only splits or merges the leading (batch, head) dims: every [L, S] matrix is kept whole, in row-major
    order, so attention computed per matrix commutes with it."""
    if not (is_call(node, *_RESHAPE_METHODS) or is_call(node, *_RESHAPE_FUNCTIONS)) or not node.args:
        return False
    x = node.args[0]
    a, b = tensor_meta(x), tensor_meta(node)
    if a is None or b is None or a.dim() < 2 or b.dim() < 2 or a.dtype != b.dtype:
        return False  # (x.view(dtype) reinterprets the bits: not a layout step)
    return _same_sizes(tuple(a.shape[-2:]), tuple(b.shape[-2:]))


def _layout_ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and the tensors it was reshaped from by layout steps (q3 = q4.reshape(B*H, L, D) -> [q3, q4])."""
    found = [node]
    while _is_layout_step(found[-1]) and isinstance(found[-1].args[0], fx.Node):
        found.append(found[-1].args[0])
    return found


def _baddbmm_operands(node: fx.Node) -> tuple | None:
    """(input, batch1, batch2, beta, alpha) of `torch.baddbmm(input, b1, b2, beta=, alpha=)` or
    `input.baddbmm(b1, b2, ...)` (batch1/batch2 given positionally or by keyword, as BLOOM does)."""
    if not is_call(node, torch.baddbmm, "baddbmm") or not node.args:
        return None
    return (node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2"), node.kwargs.get("beta", 1),
            node.kwargs.get("alpha", 1))


# ---------------------------------------------------------------------------------------------------
# Score transforms the fused ops cannot apply: recognised, recorded, kept as written
# ---------------------------------------------------------------------------------------------------


def _is_clamp(node: Any) -> bool:
    return is_call(node, torch.clamp, torch.clip, "clamp", "clip")


def _is_transform(node: Any) -> bool:
    return is_call(node, torch.tanh) or _is_clamp(node)


def _number(value: Any) -> str:
    return f"{value:g}" if is_number(value) else "c"


def _record_transform(node: fx.Node, site: AttentionSite) -> None:
    """A soft-cap `tanh(s / a) * b` (the scale ops around the tanh belong to it) or a `clamp`.

    The ops recorded so far were applied after the transform (the walk goes up from the softmax): they are
    the site's masks. What comes further up was applied before it (`pre_transform_ops`).
    """
    if site.transform_at is None:  # the transform nearest the softmax delimits the masks
        site.transform_at = len(site.mask_ops)
    cap_nodes = site.cap_nodes
    if _is_clamp(node):
        low, high = arg(node, 1, "min"), arg(node, 2, "max")
        desc = f"clamped scores (clamp(s, {_number(low) if low is not None else '-'}, "
        desc += f"{_number(high) if high is not None else '-'}))"
    else:
        outer, inner = 1.0, 1.0
        last = site.mask_ops[-1] if site.mask_ops else None
        if last is not None and last.kind == "scale" and node in last.node.all_input_nodes:
            outer = (1 / last.value if last.divide else last.value) if is_number(last.value) else None
            cap_nodes.add(last.node)
        x = node.args[0]
        if is_call(x, operator.mul, operator.truediv) and len(x.users) == 1:
            a, b = x.args
            factor = b if isinstance(a, fx.Node) and _is_scalar(b) else a if x.target is operator.mul else None
            if factor is not None and _is_scalar(factor) and factor is not x:
                cap_nodes.add(x)
                inner = (factor if x.target is operator.truediv else 1 / factor) if is_number(factor) else None
        desc = f"soft-capped scores (tanh(s / {_number(inner)}) * {_number(outer)})"
    site.score_transform = f"{site.score_transform} and {desc}" if site.score_transform else desc


# ---------------------------------------------------------------------------------------------------
# Walking up from the softmax: scale, masks and casts, down to the score matmul
# ---------------------------------------------------------------------------------------------------


def _score_step(node: fx.Node, site: AttentionSite) -> fx.Node | None:
    """One op between the score matmul and the softmax; returns its score operand, or None at the matmul."""
    if is_call(node, MATMUL):
        return None
    if _is_cast(node):
        return node.args[0]
    if _is_layout_step(node):
        return node.args[0]
    if _is_transform(node):
        _record_transform(node, site)
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


def _came_from_matmul(node: Any, depth: int = 24) -> bool:
    """Whether `node` is on the score path: reaches a score matmul through score-preserving ops only
    (casts, layout steps, scale multiplications/divisions, mask additions, masked_fill, the kept branch of a
    where, and the recognised score transforms)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if is_call(node, MATMUL) or _einsum_scores(node) is not None or _baddbmm_operands(node) is not None:
        return True
    if _is_cast(node) or _is_layout_step(node) or _is_transform(node) or is_call(node, operator.truediv, MASKED_FILL):
        operands = node.args[:1]  # scores / c, scores.masked_fill(..), scores.view(..), tanh(scores)
    elif is_call(node, operator.mul, operator.add):  # either side: c * scores, bias + scores
        operands = node.args[:2]
    elif is_call(node, WHERE):  # where(mask, scores, fill) or where(mask, fill, scores)
        operands = node.args[1:3]
    else:
        return False
    return any(_came_from_matmul(x, depth - 1) for x in operands)


def _target_name(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph output"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"`{name}`"


def _other_uses(node: fx.Node, keep: fx.Node | None) -> str:
    """The uses of `node` besides `keep`, described for a near-miss: each reader, and where it leads (a graph
    output, i.e. a returned value or one Dynamo stores back on a module; or an in-place op)."""
    parts = []
    for user in node.users:
        if user is keep:
            continue
        desc = _target_name(user)
        seen, stack, reaches = set(), [user], ""
        while stack and not reaches:
            current = stack.pop()
            if current in seen or len(seen) > 64:
                continue
            seen.add(current)
            if current.op == "output":
                reaches = "a graph output (returned, or stored on a module/global)"
            elif current.op == "call_method" and str(current.target).endswith("_"):
                reaches = f"the in-place `{current.target}` (side effects are never removed)"
            stack.extend(current.users)
        if not reaches and user.op != "output" and not is_pure(user):
            reaches = "kept although unused: not known to be free of side effects (random, in-place, ...)"
        parts.append(desc + (f" -> {reaches}" if reaches and user.op != "output" else ""))
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")


def _match_scores(softmax: fx.Node, site: AttentionSite) -> None:
    node = softmax.args[0]
    chain = []
    while True:
        if not isinstance(node, fx.Node):
            raise NotAttention("softmax input is not a tensor computed in the graph")
        if len(node.users) != 1:
            user = chain[-1] if chain else softmax
            raise NotAttention(f"scores are used outside the site: also read by {_other_uses(node, user)}")
        chain.append(node)
        einsum = _einsum_scores(node)
        if einsum is not None:
            site.q, site.k = einsum
            break
        baddbmm = _baddbmm_operands(node)
        if baddbmm is not None:  # BLOOM-style scores: alibi.baddbmm(q, k^T, beta=beta, alpha=scale)
            bias, _, _, beta, alpha = baddbmm
            if not is_number(beta) or not _is_scalar(alpha):
                raise NotAttention("baddbmm with a non-constant beta or a tensor alpha")
            if beta != 0:
                site.mask_ops.append(MaskOp("add", node, tensor=bias, value=float(beta)))
            site.mask_ops.append(MaskOp("scale", node, value=float(alpha) if is_number(alpha) else alpha))
        upstream = None if baddbmm else _score_step(node, site)
        if upstream is None:  # the score matmul
            a, b = baddbmm[1:3] if baddbmm else node.args
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
    if site.transform_at is not None:  # masks are the ops after the (last) transform; the rest came before it
        split = len(site.mask_ops) - site.transform_at
        before, after = site.mask_ops[:split], site.mask_ops[split:]
        site.pre_transform_ops = [op for op in before if op.node not in site.cap_nodes]
        site.mask_ops = [op for op in after if op.node not in site.cap_nodes]


def _match_values(softmax: fx.Node, site: AttentionSite) -> None:
    node = softmax
    while True:
        user = single_user(node)
        if user is None:
            if not node.users:
                raise NotAttention("attention weights are not used")
            matmuls = [u for u in node.users if is_call(u, MATMUL) and u.args[0] is node]
            others = _other_uses(node, matmuls[0] if len(matmuls) == 1 else None)
            raise NotAttention(f"attention weights are used outside the site: also read by {others}")
        if _is_cast(user):
            node = user
            site.chain.append(user)
            continue
        if _is_layout_step(user) and user.args[0] is node:
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


# ---------------------------------------------------------------------------------------------------
# One layout for the site: the finest split of the leading dims seen on its path
# ---------------------------------------------------------------------------------------------------


def _groups(coarse: Sequence, fine: Sequence) -> list[list[int]] | None:
    """For each coarse leading dim, the run of fine dims it merges (row-major), or None when the coarse
    layout is not a merge of the fine one. An empty run: a size-1 coarse dim the fine layout does not have."""
    groups, i = [], 0
    for size in coarse:
        if _same_size(size, 1) and (i >= len(fine) or not _same_size(fine[i], 1)):
            groups.append([])
            continue
        group, product = [], 1
        while not (group and _same_size(product, size)):
            if i >= len(fine):
                return None
            group.append(i)
            product = product * fine[i]
            i += 1
        groups.append(group)
    while i < len(fine):  # trailing size-1 fine dims join the last run
        if not _same_size(fine[i], 1) or not groups:
            return None
        groups[-1].append(i)
        i += 1
    return groups


class _Inserter:
    """Adds the layout conversions of one site before its output node, with fake values, and keeps the
    networkx data-flow graph of the mask analysis in step."""

    def __init__(self, gm: fx.GraphModule, ctx, site: AttentionSite, fake_mode):
        self.gm, self.ctx, self.site, self.fake_mode = gm, ctx, site, fake_mode
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}
        chain = set(site.chain)
        limit = self.position[site.output]
        self.sizes = [n for n in gm.graph.nodes  # SymInt values the graph already computes (dynamic shapes)
                      if self.position[n] < limit and isinstance(example_value(n), torch.SymInt)
                      and not (set(n.all_input_nodes) & chain)]

    def method(self, name: str, args: tuple) -> fx.Node:
        with self.gm.graph.inserting_before(self.site.output):
            node = self.gm.graph.call_method(name, args)
        annotate(node, fake_value(self.fake_mode, name, args, {}, method=True), self.site.anchor)
        node.meta["almostlinear_inserted"] = True
        self.site.inserted.append(node)
        if self.ctx is not None:
            self.ctx.graph.add_node(node)
            for source in node.all_input_nodes:
                self.ctx.graph.add_edge(source, node)
        return node

    def size(self, value: Any) -> Any:
        """`value` as a graph argument: an int, or a node computing that SymInt; None when the graph has none."""
        if isinstance(value, int):
            return value
        hint = None
        try:
            from torch.fx.experimental.symbolic_shapes import is_concrete_int

            hint = int(value) if is_concrete_int(value) else None
        except Exception:  # noqa: BLE001
            hint = None
        if hint is not None:
            return hint
        for node in self.sizes:
            if _same_size(example_value(node), value):
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
            target += [1] * len(group) if _same_size(shape[j], 1) else [fine[i] for i in group]
        for ancestor in _layout_ancestors(x)[1:]:  # it was reshaped from that layout: use the tensor before
            before = shape_of(ancestor)
            if _same_sizes(before[:-2], target) and _same_sizes(before[-2:], shape[-2:]):
                return ancestor
        for j in reversed(range(lead)):  # last first: earlier dims keep their index
            group = groups[offset + j]
            if len(group) == 1:
                continue
            if not group:
                if not _same_size(shape[j], 1):
                    raise NotAttention("a mask tensor does not fit the site's layout")
                x = self.method("squeeze", (x, j))
            elif _same_size(shape[j], 1):
                for _ in group[1:]:
                    x = self.method("unsqueeze", (x, j))
            else:
                x = self.method("unflatten", (x, j, self.unflatten_sizes([fine[i] for i in group])))
        return x


def _lead(node: Any) -> tuple | None:
    shape = shape_of(node)
    return None if shape is None or len(shape) < 2 else tuple(shape[:-2])


def _unify_layout(site: AttentionSite, gm: fx.GraphModule, ctx) -> None:
    """Bring q, k, v and the mask tensors to the finest leading layout on the site's path; record how the
    output goes back. Nothing is inserted when the whole site already shares one layout."""
    score_nodes = [n for n in site.chain if n is not site.k and not _last_two_dims_swapped(n)]
    path = [_lead(n) for n in score_nodes + [site.output]]
    q_chain = _layout_ancestors(site.q)
    candidates = path + [_lead(n) for n in q_chain]
    if any(c is None for c in candidates):
        raise NotAttention("a tensor of the site has no shape")
    fine = max(candidates, key=len)  # the first of the longest: the path's own layout before q's ancestors
    leads = path + [_lead(site.q), _lead(site.k), _lead(site.v)]
    if all(_same_sizes(lead, fine) for lead in leads):
        return
    for lead in path:
        if _groups(lead, fine) is None:
            raise NotAttention("attention weights are reshaped across the batch/head dims (not a split or merge)")
    inserter = _Inserter(gm, ctx, site, fake_mode_of(gm))

    def to_fine(x: fx.Node) -> fx.Node:
        for ancestor in _layout_ancestors(x):  # a reshape it came from: use the tensor before it
            if _same_sizes(_lead(ancestor), fine) and _same_sizes(shape_of(ancestor)[-2:], shape_of(x)[-2:]):
                return ancestor
        groups = _groups(_lead(x), fine)
        if groups is None:
            raise NotAttention("q, k or v is laid out across the batch/head dims differently from the weights")
        return inserter.split(x, groups, fine, 0)

    for op in site.pre_transform_ops + site.mask_ops:
        coarse = _lead(op.node)
        if coarse is None or _same_sizes(coarse, fine):
            continue
        groups = _groups(coarse, fine)
        for attr in ("tensor", "value"):
            t = getattr(op, attr)
            if op.kind == "scale" or not isinstance(t, fx.Node) or (shape_of(t) or ()) == ():
                continue
            extra = len(coarse) + 2 - len(shape_of(t))
            if extra < 0:
                raise NotAttention("a mask tensor has more dims than the scores")
            setattr(op, attr, inserter.split(t, groups, fine, extra))
    site.q, site.k, site.v = to_fine(site.q), to_fine(site.k), to_fine(site.v)
    out_groups = _groups(_lead(site.output), fine)
    steps = []
    for j in reversed(range(len(out_groups))):  # site layout -> the output's layout, last dims first
        first = out_groups[j][0] if out_groups[j] else None
        if first is None:
            steps.append(("unsqueeze", sum(len(g) for g in out_groups[:j])))
        elif len(out_groups[j]) > 1:
            steps.append(("flatten", first, out_groups[j][-1]))
    site.output_layout = steps


def _per_head_alibi(site: AttentionSite) -> None:
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
        site.kv_unrepeated = (k[0], v[0])


def _total_scale(site: AttentionSite) -> None:
    constant, symbolic = 1.0, []
    for op in site.pre_transform_ops + site.mask_ops:  # (a soft-cap's own factors are in neither)
        if op.kind != "scale":
            continue
        if is_number(op.value):
            constant = constant / op.value if op.divide else constant * op.value
        else:
            symbolic.append((op.value, op.divide))
    site.scale_factors = symbolic
    site.scale = constant if not symbolic else None
    site.constant_scale = constant
    _, fq = _peel_constant_scale(site.q)
    _, fk = _peel_constant_scale(site.k)
    site.prescale = fq * fk


def _match_eager(softmax: fx.Node, site: AttentionSite, gm: fx.GraphModule | None = None, ctx=None) -> None:
    x = softmax.args[0]
    ndim = ndim_of(x)
    dim = normalize_dim(softmax.args[1], ndim)
    if dim is None or dim != ndim - 1:
        raise NotAttention(f"softmax over dim {softmax.args[1]} (not the last)")
    site.softmax_dtype = softmax.kwargs.get("dtype")
    site.chain.append(softmax)
    _match_values(softmax, site)
    _match_scores(softmax, site)
    if gm is not None:
        _broadcast_kv_heads(site, gm, ctx)
        _unify_layout(site, gm, ctx)
    _check_shapes(site)
    _total_scale(site)
    _gqa(site)
    if site.kv_broadcast is not None:
        site.kv_unrepeated, site.gqa_groups = site.kv_broadcast, concrete_int(shape_of(site.q)[1])


def _broadcast_kv_heads(site: AttentionSite, gm: fx.GraphModule, ctx) -> None:
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
    inserter = _Inserter(gm, ctx, site, fake_mode_of(gm))
    size = inserter.size(q[1])
    if size is None:
        return
    site.kv_broadcast = (site.k, site.v)
    site.k = inserter.method("expand", (site.k, -1, size, -1, -1))
    site.v = inserter.method("expand", (site.v, -1, size, -1, -1))


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
        if isinstance(head_dim, torch.SymInt):  # dynamic=True: the head dim is a model constant, so specialise
            head_dim = int(head_dim)  # it (a guard) rather than lose the scale
        scale = 1.0 / float(head_dim) ** 0.5 if isinstance(head_dim, int) else None
    site.scale = scale
    site.constant_scale = float(scale) if is_number(scale) else 1.0
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
    """All attention sites of a normalized graph, with their masks classified, and the near-misses.

    A site whose layout changes on its path gets conversion nodes (marked `almostlinear_inserted`); those
    nothing reads after the rewrite are erased by `rewrite.finalize`."""
    graph = to_networkx(gm)
    ctx = mask_analysis._Context(gm, graph, placeholder_kinds(gm, example_inputs), example_inputs)
    sites: list[AttentionSite] = []
    misses: list[NearMiss] = []
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        form = "eager" if is_call(node, SOFTMAX) else "sdpa" if is_call(node, SDPA) else None
        if form is None or node in claimed:
            continue
        site = AttentionSite(id=len(sites), form=form, q=node, k=node, v=node, output=node)
        try:
            if form == "eager":
                _match_eager(node, site, gm, ctx)
                site.mask = mask_analysis.analyze(site.mask_ops, _scores_shape(site), ctx)
                _per_head_alibi(site)
                if site.score_transform and any(op.kind != "scale" for op in site.pre_transform_ops):
                    before = mask_analysis.analyze(site.pre_transform_ops, _scores_shape(site), ctx)
                    if before.kind != "none":  # (a zero bias is no mask)
                        site.mask = MaskSpec(kind="dense", reason=f"a mask or bias applied before the transform "
                                                                 f"({site.score_transform}) does not remove keys")
            else:
                _match_sdpa(node, site)
                site.mask = _sdpa_mask(site, ctx)
        except NotAttention as exc:
            for inserted in reversed(site.inserted):
                if not inserted.users:
                    gm.graph.erase_node(inserted)
            misses.append(NearMiss(node, str(exc)))
            continue
        site.residual = _find_residual(site.output)
        claimed.update(site.chain)
        sites.append(site)
    for node in gm.graph.nodes:  # softmax-like ops that are never attention, for the near-miss list
        if is_call(node, torch.log_softmax, F.log_softmax, "log_softmax"):
            misses.append(NearMiss(node, "log_softmax is not attention"))
    return sites, misses


def _scores_shape(site: AttentionSite) -> tuple | None:
    """The scores' shape in the site's layout: q's leading dims and query length, k's key length."""
    q, k = shape_of(site.q), shape_of(site.k)
    return None if q is None or k is None else tuple(q[:-1]) + (k[-2],)


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
            return MaskSpec(kind="causal", causal=True, reason="is_causal=True", empty_rows_possible=False,
                            empty_row_rule="none")
        if spec.kind in ("causal", "key_padding", "causal+key_padding"):
            spec.kind = "causal+key_padding" if "key_padding" in spec.kind else "causal"
            spec.causal = True
            return spec
        return MaskSpec(kind="dense", reason="is_causal combined with a non-causal mask")
    return spec
