"""Mask structure analysis: what an attention site's mask is, proved from the graph.

A site's scores pass through an ordered list of mask operations (`MaskOp`) between the score matmul and
the softmax: additive terms, `masked_fill`, `where`. Each mask tensor is classified by what it depends on:

* only shapes, buffers and constants (a causal buffer slice, `arange` comparisons, `tril`): it is
  evaluated on the example inputs and its values are classified (causal, window band, key-only, ALiBi);
* user data (a padding `attention_mask`): it is classified only when its shape proves the structure,
  i.e. it broadcasts over the query dimension, so it is a per-key mask; anything else is `dense`.

The combined `MaskSpec.kind` is one of MASK_KINDS. Only the structured kinds can be approximated.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import sympy
import torch
import torch.fx as fx

from .graph_utils import INPUT, PARAMETER, concrete_int, evaluate, input_dependencies, is_number, shape_of

MASK_KINDS = ("none", "causal", "key_padding", "causal+key_padding", "alibi", "window", "causal+window", "dense")

# An additive value below this removes a key: exp(-200) underflows to 0 in fp32 and bf16 (and fp16).
BLOCKED_BELOW = -200.0


@dataclass
class MaskOp:
    """One operation between the score matmul and the softmax.

    kind: "scale" (scores * factor), "add" (scores + tensor), "fill" (where(cond, value, scores)),
          "keep" (where(cond, scores, value)).
    """

    kind: str
    node: fx.Node  # the graph node applying the operation
    tensor: Any = None  # the additive tensor, or the boolean condition
    value: Any = None  # the scale factor, the fill value, or (add) a constant factor on the tensor
    divide: bool = False  # scale given as a division


@dataclass
class MaskSpec:
    kind: str = "none"
    causal: bool = False
    window: int = 0
    key_mask: list = field(default_factory=list)  # nodes of data-dependent per-key additive/bool terms
    # Static keys removed for every query (a constant/buffer mask proved per-key): bool [S], True = kept.
    # The polynomial rewrite turns it into a key weight; dropping it would let masked values through.
    static_keys: torch.Tensor | None = None
    alibi_slopes: list[float] | None = None
    reason: str = ""  # why the mask is dense (or how it was proved)
    empty_rows_possible: bool = True  # False only when proved that every query keeps at least one key
    # What eager gives on a row whose every key is blocked (softmax of equal or -inf values), see
    # EMPTY_ROW_RULES; the polynomial rewrite reproduces "nan", "uniform" and "argmax", else stays exact.
    empty_row_rule: str = "unknown"

    @property
    def structured(self) -> bool:
        return self.kind != "dense"


# Eager's value on a fully masked row: "nan" (every blocking value is -inf), "uniform" (every entry of such a row
# holds the same finite value, e.g. HF's where(allowed, 0, finfo.min): the mean of all values), "argmax" (one
# additive per-key term: the mean of the values at the keys with the largest mask value), "unknown" (several
# finite blocking ops: depends on how they combine), "none" (proved impossible).
EMPTY_ROW_RULES = ("none", "nan", "uniform", "argmax", "unknown")


@dataclass
class _Facts:
    """What is known of the combined mask: static allowed set and bias, plus data-dependent key terms."""

    allowed: torch.Tensor | None = None  # bool [..., L, S] from the static parts (None: all allowed)
    bias: torch.Tensor | None = None  # float [..., L, S] finite static additive part
    key_terms: list = field(default_factory=list)
    dense_reason: str = ""
    data_dependent: bool = False
    op_index: int = -1  # the mask op being decomposed
    fill: float | None = None  # its blocking value (None: an additive tensor's own values)
    replacing: bool = False  # the op being decomposed replaces scores (masked_fill / where) rather than adds
    blocking_ops: dict = field(default_factory=dict)  # index of an op that removes keys -> replaces scores?
    fills: dict = field(default_factory=dict)  # op index -> its blocking value as the softmax sees it (None: data)

    def blocks(self, fill: float | None = "current") -> None:
        self.blocking_ops[self.op_index] = self.replacing
        self.fills[self.op_index] = self.fill if fill == "current" else fill


def _static_value(op_tensor: Any, ctx: "_Context") -> Any:
    if isinstance(op_tensor, fx.Node):
        value = evaluate(ctx.gm, ctx.graph, op_tensor, ctx.example_inputs)
        if is_fake(value):  # fake example inputs (e.g. a piece compiled by DDPOptimizer): values unknown
            raise ValueError("its value is unknown: the example inputs are fake (a DDPOptimizer piece?)")
        return value.cpu() if isinstance(value, torch.Tensor) else value  # classified on the CPU
    return op_tensor


def is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


@dataclass
class _Context:
    gm: fx.GraphModule
    graph: nx.DiGraph
    kinds: dict
    example_inputs: Sequence[Any]


def _depends_on_data(node: Any, ctx: _Context) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return bool(input_dependencies(ctx.graph, node, ctx.kinds) & {INPUT, PARAMETER})


def _broadcasts_over_queries(node: fx.Node) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) >= 2 and shape[-2] == 1


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b


def _apply_static(facts: _Facts, op: MaskOp, ctx: _Context) -> None:
    if op.kind == "add":
        value = _static_value(op.tensor, ctx)
        value = torch.as_tensor(value).float()
        blocked = (value < BLOCKED_BELOW) | value.isnan()
        finite = torch.where(blocked, torch.zeros_like(value), value)
        if bool(blocked.any()):
            values = value[blocked].unique()
            facts.blocks(float(values[0]) if values.numel() == 1 else None)
        facts.allowed = _and(facts.allowed, ~blocked)
        facts.bias = finite if facts.bias is None else facts.bias + finite
    elif op.kind in ("fill", "keep"):
        cond = torch.as_tensor(_static_value(op.tensor, ctx)).bool()
        value = float(op.value)
        if value < BLOCKED_BELOW:
            facts.allowed = _and(facts.allowed, ~cond if op.kind == "fill" else cond)
            facts.blocks(value)
        else:
            facts.dense_reason = f"masked_fill with a finite value {value} rewrites scores instead of removing keys"


@dataclass
class KeyTerm:
    """A data-dependent per-key mask term, proved to broadcast over the query dim ([..., 1, S]).

    kind: "allowed" (bool, True keeps the key), "blocked" (bool, True removes it) or "additive" (float
    added to the scores, times `factor` for scale ops applied after it).
    """

    node: fx.Node
    kind: str
    factor: float = 1.0


_PASS_THROUGH_METHODS = ("expand", "to", "contiguous", "clone", "bool", "float", "type_as", "expand_as")


def _is_pass_through(node: fx.Node) -> bool:
    """Ops that keep the values of their first operand (broadcast, device or dtype moves)."""
    return (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS) or (
        node.op == "call_function" and node.target in (torch.Tensor.expand, torch.broadcast_to)
    )


def _broadcast_source(node: fx.Node) -> fx.Node | None:
    """The tensor an expand/broadcast/contiguous/clone was applied to (same values and dtype), if that one
    also broadcasts over queries: HF expands a [B, 1, 1, S] padding mask over heads; the op takes it per key."""
    same_values = (node.op == "call_method" and node.target in ("expand", "expand_as", "contiguous", "clone")) or (
        node.op == "call_function" and node.target in (torch.Tensor.expand, torch.broadcast_to))
    source = node.args[0] if same_values and node.args else None
    if isinstance(source, fx.Node) and _broadcasts_over_queries(source):
        return source
    return None


def _scalar(value: Any, ctx: "_Context") -> float | None:
    if is_number(value):
        return float(value)
    if isinstance(value, fx.Node) and not _depends_on_data(value, ctx):
        try:
            v = _static_value(value, ctx)
        except Exception:  # noqa: BLE001
            return None
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.reshape(()))
    return None


def _bool_terms(node: Any, negate: bool, facts: _Facts, ctx: "_Context") -> None:
    """Decompose a boolean mask (True = allowed, or blocked when `negate`) into static and key parts."""
    if not isinstance(node, fx.Node) or not _depends_on_data(node, ctx):
        cond = torch.as_tensor(_static_value(node, ctx)).bool()
        facts.allowed = _and(facts.allowed, ~cond if negate else cond)
        facts.blocks()
        return
    if _broadcasts_over_queries(node):
        while _broadcast_source(node) is not None:
            node = _broadcast_source(node)
        facts.key_terms.append(KeyTerm(node, "blocked" if negate else "allowed"))
        facts.blocks()
        return
    target = node.target
    if _is_pass_through(node):
        return _bool_terms(node.args[0], negate, facts, ctx)
    if target in (operator.and_, torch.logical_and, torch.bitwise_and) and not negate:
        for a in node.args[:2]:
            _bool_terms(a, negate, facts, ctx)
        return
    if target in (operator.or_, torch.logical_or, torch.bitwise_or) and negate:  # ~(a | b) = ~a & ~b
        for a in node.args[:2]:
            _bool_terms(a, negate, facts, ctx)
        return
    if target in (operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "bitwise_not"):
        return _bool_terms(node.args[0], not negate, facts, ctx)
    if target in (operator.eq, torch.eq) and _scalar(node.args[1], ctx) == 0.0:  # `mask == 0` is `~mask`
        return _bool_terms(node.args[0], not negate, facts, ctx)
    raise _DenseMask("mask depends on data along the query dim")


class _DenseMask(Exception):
    pass


def _additive_terms(node: Any, facts: _Facts, ctx: "_Context") -> None:
    """Decompose an additive float mask into static values, boolean structure and key terms."""
    if not isinstance(node, fx.Node) or not _depends_on_data(node, ctx):
        _apply_static(facts, MaskOp("add", None, tensor=node), ctx)
        return
    if _broadcasts_over_queries(node):
        while _broadcast_source(node) is not None:
            node = _broadcast_source(node)
        facts.key_terms.append(KeyTerm(node, "additive"))
        facts.blocks(None)
        return
    if _is_pass_through(node):
        return _additive_terms(node.args[0], facts, ctx)
    if node.target in (operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
        for a in node.args:
            _additive_terms(a, facts, ctx)
        return
    if node.target is torch.where and len(node.args) == 3:
        cond, a, b = node.args
        va, vb = _scalar(a, ctx), _scalar(b, ctx)
        if va == 0.0 and vb is not None and vb < BLOCKED_BELOW:  # where(allowed, 0, min): HF masks
            facts.fill = vb
            return _bool_terms(cond, False, facts, ctx)
        if vb == 0.0 and va is not None and va < BLOCKED_BELOW:
            facts.fill = va
            return _bool_terms(cond, True, facts, ctx)
    if node.target in (torch.masked_fill, "masked_fill"):
        base, cond, value = node.args[0], node.args[1], node.args[2]
        v = _scalar(value, ctx)
        if v is not None and v < BLOCKED_BELOW:
            _additive_terms(base, facts, ctx)
            facts.fill = v
            return _bool_terms(cond, True, facts, ctx)
    raise _DenseMask("mask depends on data along the query dim")


def analyze(ops: Sequence[MaskOp], scores_shape: tuple | None, ctx: _Context) -> MaskSpec:
    """Classify the combined mask of one site from its ordered mask operations.

    With symbolic lengths (dynamic shapes) the static parts are evaluated at the example size and at probe
    sizes (see `_holds_at_other_lengths`); a structure that holds at every size stays symbolic, anything
    else specialises the lengths (a guard: Dynamo recompiles for another length, never runs a wrong mask).
    """
    spec, facts = _analyze_at(ops, scores_shape, ctx)
    has_static = facts.allowed is not None or facts.bias is not None
    lengths = [d for d in (scores_shape or ())[-2:] if isinstance(d, torch.SymInt)]
    if lengths and has_static and not _holds_safely(spec, ops, scores_shape, ctx):
        for d in lengths:
            int(d)  # guard on the example length: this mask's structure was proved at this size only
        spec.reason += " (specialised to this length: the structure is not the same at other lengths)"
    return spec


def _analyze_at(ops: Sequence[MaskOp], scores_shape: tuple | None, ctx: _Context) -> tuple[MaskSpec, _Facts]:
    facts = _Facts()
    for index, op in enumerate(ops):
        facts.op_index, facts.fill = index, None if op.kind == "add" else _scalar(op.value, ctx)
        facts.replacing = op.kind in ("fill", "keep")
        if op.kind == "scale":
            factor = _scalar(op.value, ctx)
            if factor is not None and op.divide:
                factor = 1.0 / factor
            for term in facts.key_terms:
                if term.kind == "additive" and factor is None:
                    facts.dense_reason = "a per-key additive mask is scaled by a factor unknown at compile time"
                elif term.kind == "additive":
                    term.factor = term.factor * factor
            facts.fills = {i: None if f is None or factor is None else f * factor for i, f in facts.fills.items()}
            if facts.bias is not None:  # (s + bias) * c: the softmax sees c * bias (ALiBi slopes scale too)
                if factor is None:
                    facts.dense_reason = "a static bias is scaled by a factor unknown at compile time"
                else:
                    facts.bias = facts.bias * factor
            continue
        if op.kind in ("fill", "keep") and not is_number(op.value):
            facts.dense_reason = "masked_fill/where with a tensor fill value"
            continue
        try:
            if op.kind == "add":
                beta = 1.0 if op.value is None else float(op.value)
                before = len(facts.key_terms)
                if beta != 1.0 and not _depends_on_data(op.tensor, ctx):
                    _apply_static(facts, MaskOp("add", op.node, tensor=beta * torch.as_tensor(_static_value(op.tensor, ctx))), ctx)
                else:
                    _additive_terms(op.tensor, facts, ctx)
                for term in facts.key_terms[before:]:
                    term.factor *= beta
            elif float(op.value) < BLOCKED_BELOW:
                _bool_terms(op.tensor, op.kind == "fill", facts, ctx)
            elif _depends_on_data(op.tensor, ctx):
                raise _DenseMask(f"masked_fill with a finite value {op.value} rewrites scores")
            else:
                _apply_static(facts, op, ctx)
        except _DenseMask as exc:
            facts.dense_reason = str(exc)
            facts.data_dependent = True
        except Exception as exc:  # noqa: BLE001 - an unevaluable mask is simply not understood
            facts.dense_reason = f"mask could not be evaluated at compile time ({type(exc).__name__}: {exc})"[:160]
    spec = _combine(facts, scores_shape)
    spec.empty_rows_possible = bool(facts.key_terms) or facts.data_dependent or bool(facts.dense_reason) or (
        facts.allowed is not None and not bool(facts.allowed.any(dim=-1).all())
    )
    spec.empty_row_rule = _empty_row_rule(facts) if spec.empty_rows_possible else "none"
    return spec, facts


def _empty_row_rule(facts: _Facts) -> str:
    """What eager gives on a row whose every key is blocked (see EMPTY_ROW_RULES)."""
    fills = set(facts.fills.values())
    if facts.dense_reason:
        return "unknown"
    if fills == {float("-inf")}:
        return "nan"  # -inf stays -inf whichever way the ops combine
    if fills == {None}:
        additive = [t for t in facts.key_terms if t.kind == "additive"]
        single = len(facts.blocking_ops) == 1 and len(additive) == 1 and len(facts.key_terms) == 1
        return "argmax" if single and facts.allowed is None else "unknown"
    one_value = len(fills) == 1 and None not in fills and math.isfinite(next(iter(fills)))
    if one_value and (len(facts.blocking_ops) == 1 or all(facts.blocking_ops.values())):
        # one op blocks with one value, or every blocking op replaces the score by the same value: a fully
        # blocked row is constant, so eager gives the mean of all values
        return "uniform"
    return "unknown"


def _holds_safely(spec: MaskSpec, ops: Sequence[MaskOp], scores_shape: tuple, ctx: _Context) -> bool:
    try:
        return _holds_at_other_lengths(spec, ops, scores_shape, ctx)
    except Exception:  # noqa: BLE001 - a probe we cannot build: specialise (correct, one graph per length)
        return False


PROBE_CAP = 4096  # the largest length a mask is re-evaluated at (a [4096, 4096] mask: 16 M elements)


def _holds_at_other_lengths(spec: MaskSpec, ops: Sequence[MaskOp], scores_shape: tuple, ctx: _Context) -> bool:
    """Whether the static mask has this structure at other lengths: re-evaluated with the symbolic lengths
    set to probe values (2, 3, about half, one less, one more, twice the example, and the largest length
    up to PROBE_CAP where it can be built, so a sliced buffer is checked whole), each compared with what
    the structure predicts at that size. A length where the mask cannot be built (a buffer sliced past its
    end) is a length eager cannot run either. A static per-key mask is a pattern of this length only."""
    if spec.kind == "dense" or spec.static_keys is not None:
        return spec.kind == "dense"  # a dense mask is kept exact at every length: nothing to prove
    symbols = {sym for d in scores_shape[-2:] if isinstance(d, torch.SymInt) for sym in d.node.expr.free_symbols}
    hints = _symbol_hints(ctx, symbols)
    if hints is None:
        return False
    h = max(hints.values())

    @functools.lru_cache(maxsize=None)  # the binary search and the cap probe revisit lengths
    def at(length: int):
        probe = {sym: length for sym in hints}
        shape = tuple(_substitute(d, probe) for d in scores_shape)
        try:
            _, facts = _analyze_at(ops, shape, _Context(ctx.gm, ctx.graph, ctx.kinds, _probe_inputs(ctx, probe)))
        except Exception:  # noqa: BLE001 - not evaluable at this length: eager fails there too
            return None
        return None if facts.dense_reason else _predicted_by(spec, facts, *_rows_cols(shape))

    results = [at(n) for n in sorted({2, 3, h // 2 + 1, max(2, h - 1), h + 1, 2 * h + 1})]
    largest = PROBE_CAP
    if at(PROBE_CAP) is None:  # the largest evaluable length in (h, cap): a buffer's full extent
        lo, hi = h, PROBE_CAP
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid) is not None else (lo, mid)
        largest = lo
    results.append(at(largest))
    return all(r is not False for r in results) and any(r for r in results)


def _predicted_by(spec: MaskSpec, facts: _Facts, L: int, S: int) -> bool:
    """Whether the evaluated static mask is exactly what `spec` predicts at [L, S]."""
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    expected = torch.ones(L, S, dtype=torch.bool)
    if spec.causal:
        expected &= j <= i
        if spec.window:
            expected &= j > i - spec.window
    elif spec.window:
        expected &= (i - j).abs() < spec.window
    allowed = torch.ones(L, S, dtype=torch.bool) if facts.allowed is None else facts.allowed
    allowed = torch.broadcast_to(allowed, allowed.shape[:-2] + (L, S)).reshape(-1, L, S)
    if not bool((allowed == expected).all()):
        return False
    if spec.alibi_slopes is None:
        return facts.bias is None or not bool((facts.bias != 0).any())
    if facts.bias is None:
        return False
    bias = torch.broadcast_to(facts.bias.float(), facts.bias.shape[:-2] + (L, S))
    slopes = _alibi_slopes(bias, allowed.reshape(bias.shape[:-2] + (L, S)) if allowed.shape[0] > 1 else allowed[0],
                           L, S) if L > 1 else spec.alibi_slopes
    return slopes is not None and len(slopes) == len(spec.alibi_slopes) and all(
        math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(slopes, spec.alibi_slopes))


def _symbol_hints(ctx: _Context, symbols: set) -> dict | None:
    """The example value of every symbol, read from the placeholders' fake shapes and the example inputs."""
    hints = {}
    for node, example in zip([n for n in ctx.gm.graph.nodes if n.op == "placeholder"], ctx.example_inputs):
        fake = node.meta.get("example_value")
        if isinstance(fake, torch.SymInt) and fake.node.expr in symbols and concrete_int(example) is not None:
            hints[fake.node.expr] = concrete_int(example)
        elif isinstance(fake, torch.Tensor) and isinstance(example, torch.Tensor):
            for d, real in zip(fake.shape, example.shape):
                if isinstance(d, torch.SymInt) and d.node.expr in symbols:
                    hints[d.node.expr] = int(real)
    return hints if set(hints) == set(symbols) else None


def _substitute(d: Any, probe: dict) -> Any:
    if not isinstance(d, torch.SymInt):
        return d
    expr = d.node.expr
    value = sympy.sympify(expr.xreplace(probe))
    if value.free_symbols:  # other symbols (e.g. the batch): their example values do not matter here
        env = d.node.shape_env
        known = getattr(env, "backed_var_to_val", None) or env.var_to_val
        value = value.xreplace({s: known.get(s, 2) for s in value.free_symbols})
    return int(value)


def _probe_inputs(ctx: _Context, probe: dict) -> list | None:
    """The example inputs with every dim of a probed symbol resized (zeros: only shapes matter here)."""
    inputs = []
    for node, example in zip([n for n in ctx.gm.graph.nodes if n.op == "placeholder"], ctx.example_inputs):
        fake = node.meta.get("example_value")
        if isinstance(fake, torch.SymInt) and isinstance(example, (int, torch.SymInt)):
            inputs.append(_substitute(fake, probe))
        elif isinstance(fake, torch.Tensor) and isinstance(example, torch.Tensor) and any(
                isinstance(d, torch.SymInt) and d.node.expr.free_symbols & set(probe) for d in fake.shape):
            shape = [_substitute(d, probe) if isinstance(d, torch.SymInt) and d.node.expr.free_symbols & set(probe)
                     else int(real) for d, real in zip(fake.shape, example.shape)]
            inputs.append(torch.zeros(shape, dtype=example.dtype, device=example.device))
        else:
            inputs.append(example)
    return inputs


def _combine(facts: _Facts, scores_shape: tuple | None) -> MaskSpec:
    if facts.dense_reason:
        return MaskSpec(kind="dense", reason=facts.dense_reason)
    structure = classify_static(facts.allowed, facts.bias, scores_shape)
    if structure.kind == "dense":
        return structure
    if facts.key_terms:
        if structure.kind in ("none", "key_padding"):
            structure.kind = "key_padding"
        elif structure.kind in ("causal", "causal+key_padding"):
            structure.kind = "causal+key_padding"
        else:
            return MaskSpec(kind="dense", reason=f"{structure.kind} combined with a data-dependent key mask")
        structure.key_mask = list(facts.key_terms)
        structure.reason = "key mask broadcasts over the query dim"
    return structure


def _rows_cols(shape: tuple | None) -> tuple[int, int] | None:
    if shape is None or len(shape) < 2:
        return None
    rows, cols = concrete_int(shape[-2]), concrete_int(shape[-1])  # the example size, without a guard
    return None if rows is None or cols is None else (rows, cols)


def classify_static(allowed: torch.Tensor | None, bias: torch.Tensor | None, scores_shape: tuple | None) -> MaskSpec:
    """Classify concrete mask values broadcast to the scores' last two dims [L, S]."""
    if allowed is None and bias is None:
        return MaskSpec(kind="none", reason="no mask")
    rc = _rows_cols(scores_shape)
    if rc is None:
        return MaskSpec(kind="dense", reason="scores have no static shape")
    L, S = rc
    ones = torch.ones(L, S, dtype=torch.bool)
    allowed = ones if allowed is None else torch.broadcast_to(allowed, allowed.shape[:-2] + (L, S)) & ones
    bias_full = None if bias is None else torch.broadcast_to(bias, bias.shape[:-2] + (L, S)).float()
    # All leading (batch, head) slices must share one structure for the kinds below.
    flat = allowed.reshape(-1, L, S)
    if not bool((flat == flat[:1]).all()):
        return MaskSpec(kind="dense", reason="mask structure differs across batch or heads")
    pattern = flat[0]
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    slopes = None
    if bias_full is not None and bool((bias_full != 0).any()):
        slopes = _alibi_slopes(bias_full, allowed, L, S)
        if slopes is None:
            return MaskSpec(kind="dense", reason="additive bias is not ALiBi-shaped (m*(j-i) per head)")
    static_keys = None
    if bool(pattern.all()):
        kind, causal, window = "none", False, 0
    elif L == S and bool((pattern == (j <= i)).all()):
        kind, causal, window = "causal", True, 0
    else:
        band = _band_width(pattern, i, j, L, S)
        if band is not None:
            kind, causal, window = band
        elif bool((pattern == pattern[:1]).all()):  # the same keys removed for every query
            kind, causal, window, static_keys = "key_padding", False, 0, pattern[0].clone()
        elif L == S and bool((pattern == ((j <= i) & pattern[-1:])).all()):
            kind, causal, window, static_keys = "causal+key_padding", True, 0, pattern[-1].clone()
        else:
            return MaskSpec(kind="dense", reason="mask is not causal, banded or per-key")
    if slopes is not None:
        if kind not in ("none", "causal"):
            return MaskSpec(kind="dense", reason=f"ALiBi bias combined with a {kind} mask")
        return MaskSpec(kind="alibi", causal=causal, alibi_slopes=slopes, reason="bias m*(j-i) per head")
    return MaskSpec(kind=kind, causal=causal, window=window, static_keys=static_keys,
                    reason=f"proved from mask values ({kind})")


def _band_width(pattern, i, j, L, S):
    if L != S:
        return None
    for causal in (True, False):
        # width w: the number of allowed keys in the last row (causal) or around the diagonal
        width = int(pattern[-1].sum().item()) if causal else int(pattern[L // 2, L // 2 :].sum().item())
        if width <= 0 or width >= S:
            continue
        band = (j <= i) & (j > i - width) if causal else ((i - j).abs() < width)
        if bool((pattern == band).all()):
            return ("causal+window" if causal else "window"), causal, width
    return None


def _alibi_slopes(bias, allowed, L, S):
    """Per-head slopes m when bias[..., h, i, j] = m_h * (j - i) + c_i on allowed entries, else None."""
    if bias.dim() < 3:
        bias = bias.reshape(1, L, S)
    heads = bias.reshape(-1, L, S)
    mask = allowed.reshape(-1, L, S) if allowed.dim() >= 3 else allowed.reshape(1, L, S)
    j = torch.arange(S, dtype=torch.float32)
    slopes = []
    for h in range(heads.shape[0]):
        m_allowed = mask[h % mask.shape[0]]
        row = heads[h]
        # slope from consecutive allowed pairs in each row; constant per row (c_i) cancels in softmax
        diff = row[:, 1:] - row[:, :-1]
        valid = m_allowed[:, 1:] & m_allowed[:, :-1]
        if not bool(valid.any()):
            slopes.append(0.0)
            continue
        m = float(diff[valid].mean())
        predicted = m * j.unsqueeze(0)
        centered = row - predicted
        top = torch.where(m_allowed, centered, float("-inf")).amax(dim=1)
        bottom = torch.where(m_allowed, centered, float("inf")).amin(dim=1)
        rows = m_allowed.any(dim=1)
        if not bool(((top - bottom)[rows] <= 1e-4 * (1 + abs(m) * S)).all()):
            return None
        slopes.append(m)
    if all(math.isclose(s, 0.0, abs_tol=1e-12) for s in slopes):
        return None
    return slopes
