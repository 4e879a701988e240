"""What each mask operation contributes, op by op, at the example size (`collect_facts`).

A mask tensor that depends only on shapes, buffers and constants is evaluated on the example inputs and
joins the static allowed set and bias. One that depends on user data is decomposed (sums, `&`, `~`,
`where(allowed, 0, min)`, `masked_fill`, broadcasts) down to terms that broadcast over the query dim: those
are per-key terms (`KeyTerm`); anything else makes the mask dense.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from .graph_utils import INPUT, PARAMETER, evaluate, input_dependencies, is_fake, is_number, shape_of
from .mask_alibi import linear_key_bias
from .mask_ops import BLOCKED_BELOW, KeyTerm, MaskContext, MaskOp


@dataclass
class MaskFacts:
    """What is known of the combined mask: static allowed set and bias, plus data-dependent key terms."""

    allowed: torch.Tensor | None = None  # bool [..., L, S] from the static parts (None: all allowed)
    bias: torch.Tensor | None = None  # float [..., L, S] finite static additive part
    key_terms: list[KeyTerm] = field(default_factory=list)
    dense_reason: str = ""
    data_dependent: bool = False
    op_index: int = -1  # the mask op being decomposed
    fill: float | None = None  # its blocking value (None: an additive tensor's own values)
    replacing: bool = False  # the op being decomposed replaces scores (masked_fill / where) rather than adds
    blocking_ops: dict = field(default_factory=dict)  # index of an op that removes keys -> replaces scores?
    fills: dict = field(default_factory=dict)  # op index -> its blocking value as the softmax sees it (None: data)

    def blocks(self, fill: float | None | str = "current") -> None:
        """Record that the op being decomposed removes keys, with its blocking value (default: `self.fill`)."""
        self.blocking_ops[self.op_index] = self.replacing
        self.fills[self.op_index] = self.fill if fill == "current" else fill

    def allow_only(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed if self.allowed is None else self.allowed & allowed

    def add_key_term(self, node: fx.Node, kind: str, fill: float | None | str = "current") -> None:
        """A term broadcasting over queries, taken from the tensor it was expanded from (HF expands a
        [B, 1, 1, S] padding mask over heads; the op takes it per key)."""
        while _broadcast_source(node) is not None:
            node = _broadcast_source(node)
        self.key_terms.append(KeyTerm(node, kind))
        self.blocks(fill)


class DenseMask(Exception):
    """A mask that depends on data along the query dim: the message says why."""


def static_value(op_tensor: Any, ctx: MaskContext) -> Any:
    """The value of a mask tensor that depends on shapes, buffers and constants only, on the CPU."""
    if isinstance(op_tensor, fx.Node):
        value = evaluate(ctx.gm, ctx.graph, op_tensor, ctx.example_inputs)
        if is_fake(value):  # fake example inputs (e.g. a piece compiled by DDPOptimizer): values unknown
            raise ValueError("its value is unknown: the example inputs are fake (a DDPOptimizer piece?)")
        return value.cpu() if isinstance(value, torch.Tensor) else value  # classified on the CPU
    return op_tensor


def depends_on_data(node: Any, ctx: MaskContext) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return bool(input_dependencies(ctx.graph, node, ctx.kinds) & {INPUT, PARAMETER})


def scalar_of(value: Any, ctx: MaskContext) -> float | None:
    """A number, or a one-element static tensor's value; None when unknown at compile time."""
    if is_number(value):
        return float(value)
    if isinstance(value, fx.Node) and not depends_on_data(value, ctx):
        try:
            v = static_value(value, ctx)
        except Exception:  # noqa: BLE001
            return None
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.reshape(()))
    return None


def _broadcasts_over_queries(node: fx.Node) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) >= 2 and shape[-2] == 1


_PASS_THROUGH_METHODS = ("expand", "to", "contiguous", "clone", "bool", "float", "type_as", "expand_as")
_BROADCAST_FUNCTIONS = (torch.Tensor.expand, torch.broadcast_to)


def _is_pass_through(node: fx.Node) -> bool:
    """Ops that keep the values of their first operand (broadcast, device or dtype moves)."""
    return (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS) or (
        node.op == "call_function" and node.target in _BROADCAST_FUNCTIONS
    )


def _broadcast_source(node: fx.Node) -> fx.Node | None:
    """The tensor an expand/broadcast/contiguous/clone was applied to (same values and dtype), if that one
    also broadcasts over queries."""
    same_values = (node.op == "call_method" and node.target in ("expand", "expand_as", "contiguous", "clone")) or (
        node.op == "call_function" and node.target in _BROADCAST_FUNCTIONS)
    source = node.args[0] if same_values and node.args else None
    if isinstance(source, fx.Node) and _broadcasts_over_queries(source):
        return source
    return None


# ---------------------------------------------------------------------------------------------------
# Decomposing one mask tensor
# ---------------------------------------------------------------------------------------------------


def _add_static(facts: MaskFacts, value: Any) -> None:
    """A static additive mask: values below BLOCKED_BELOW (or NaN) remove keys, the rest is bias."""
    value = torch.as_tensor(value).float()
    blocked = (value < BLOCKED_BELOW) | value.isnan()
    if bool(blocked.any()) and linear_key_bias(value):  # an ALiBi bias (MPT: m * (j - (S - 1))), not a fill
        blocked = value == float("-inf")
    finite = torch.where(blocked, torch.zeros_like(value), value)
    if bool(blocked.any()):
        values = value[blocked].unique()
        facts.blocks(float(values[0]) if values.numel() == 1 else None)
    facts.allow_only(~blocked)
    facts.bias = finite if facts.bias is None else facts.bias + finite


_AND = (operator.and_, torch.logical_and, torch.bitwise_and)
_OR = (operator.or_, torch.logical_or, torch.bitwise_or)
_NOT = (operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "bitwise_not")


def _is_zero_test(node: fx.Node, ctx: MaskContext) -> bool:
    """`mask == 0`, which is `~mask`."""
    return node.target in (operator.eq, torch.eq) and scalar_of(node.args[1], ctx) == 0.0


def _bool_terms(node: Any, negate: bool, facts: MaskFacts, ctx: MaskContext) -> None:
    """Decompose a boolean mask (True = allowed, or blocked when `negate`) into static and key parts."""
    if not isinstance(node, fx.Node) or not depends_on_data(node, ctx):
        cond = torch.as_tensor(static_value(node, ctx)).bool()
        facts.allow_only(~cond if negate else cond)
        facts.blocks()
    elif _broadcasts_over_queries(node):
        facts.add_key_term(node, "blocked" if negate else "allowed")
    elif _is_pass_through(node):
        _bool_terms(node.args[0], negate, facts, ctx)
    elif (node.target in _AND and not negate) or (node.target in _OR and negate):  # ~(a | b) = ~a & ~b
        for a in node.args[:2]:
            _bool_terms(a, negate, facts, ctx)
    elif node.target in _NOT or _is_zero_test(node, ctx):
        _bool_terms(node.args[0], not negate, facts, ctx)
    else:
        raise DenseMask("mask depends on data along the query dim")


def _blocking_where(node: fx.Node, ctx: MaskContext) -> tuple[Any, bool, float] | None:
    """(condition, negate, blocking value) of `where(allowed, 0, min)` (HF masks) or `where(blocked, min, 0)`."""
    if node.target is not torch.where or len(node.args) != 3:
        return None
    cond, a, b = node.args
    va, vb = scalar_of(a, ctx), scalar_of(b, ctx)
    if va == 0.0 and vb is not None and vb < BLOCKED_BELOW:
        return cond, False, vb
    if vb == 0.0 and va is not None and va < BLOCKED_BELOW:
        return cond, True, va
    return None


def _blocking_fill(node: fx.Node, ctx: MaskContext) -> float | None:
    """The blocking value of `masked_fill(base, blocked, min)`."""
    if node.target not in (torch.masked_fill, "masked_fill"):
        return None
    v = scalar_of(node.args[2], ctx)
    return v if v is not None and v < BLOCKED_BELOW else None


def _additive_terms(node: Any, facts: MaskFacts, ctx: MaskContext) -> None:
    """Decompose an additive float mask into static values, boolean structure and key terms."""
    if not isinstance(node, fx.Node) or not depends_on_data(node, ctx):
        _add_static(facts, static_value(node, ctx))
    elif _broadcasts_over_queries(node):
        facts.add_key_term(node, "additive", None)
    elif _is_pass_through(node):
        _additive_terms(node.args[0], facts, ctx)
    elif node.target in (operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
        for a in node.args:
            _additive_terms(a, facts, ctx)
    elif (where := _blocking_where(node, ctx)) is not None:
        cond, negate, facts.fill = where
        _bool_terms(cond, negate, facts, ctx)
    elif (fill := _blocking_fill(node, ctx)) is not None:
        _additive_terms(node.args[0], facts, ctx)
        facts.fill = fill
        _bool_terms(node.args[1], True, facts, ctx)
    else:
        raise DenseMask("mask depends on data along the query dim")


# ---------------------------------------------------------------------------------------------------
# The ops of one site, in graph order
# ---------------------------------------------------------------------------------------------------


def _apply_scale(facts: MaskFacts, op: MaskOp, ctx: MaskContext) -> None:
    """(s + mask) * c: the softmax sees c times every additive term, bias and blocking value so far."""
    factor = scalar_of(op.value, ctx)
    if factor is not None and op.divide:
        factor = 1.0 / factor
    for term in facts.key_terms:
        if term.kind == "additive" and factor is None:
            facts.dense_reason = "a per-key additive mask is scaled by a factor unknown at compile time"
        elif term.kind == "additive":
            term.factor = term.factor * factor
    facts.fills = {i: None if f is None or factor is None else f * factor for i, f in facts.fills.items()}
    if facts.bias is not None:  # (ALiBi slopes scale too)
        if factor is None:
            facts.dense_reason = "a static bias is scaled by a factor unknown at compile time"
        else:
            facts.bias = facts.bias * factor


def _apply_add(facts: MaskFacts, op: MaskOp, ctx: MaskContext) -> None:
    """scores + beta * tensor (beta: `op.value`, from baddbmm)."""
    beta = 1.0 if op.value is None else float(op.value)
    before = len(facts.key_terms)
    if beta != 1.0 and not depends_on_data(op.tensor, ctx):
        _add_static(facts, beta * torch.as_tensor(static_value(op.tensor, ctx)))
    else:
        _additive_terms(op.tensor, facts, ctx)
    for term in facts.key_terms[before:]:
        term.factor *= beta


def _apply_mask_op(facts: MaskFacts, op: MaskOp, ctx: MaskContext) -> None:
    """An add, fill or keep op; a failure to understand it makes the mask dense, with the reason."""
    try:
        if op.kind == "add":
            _apply_add(facts, op, ctx)
        elif float(op.value) < BLOCKED_BELOW:
            _bool_terms(op.tensor, op.kind == "fill", facts, ctx)
        elif depends_on_data(op.tensor, ctx):
            raise DenseMask(f"masked_fill with a finite value {op.value} rewrites scores")
        else:  # a static condition is still evaluated first: one that cannot be is reported as such
            torch.as_tensor(static_value(op.tensor, ctx))
            facts.dense_reason = (f"masked_fill with a finite value {float(op.value)} rewrites scores instead of "
                                  f"removing keys")
    except DenseMask as exc:
        facts.dense_reason = str(exc)
        facts.data_dependent = True
    except Exception as exc:  # noqa: BLE001 - an unevaluable mask is simply not understood
        facts.dense_reason = f"mask could not be evaluated at compile time ({type(exc).__name__}: {exc})"[:160]


def collect_facts(ops: Sequence[MaskOp], ctx: MaskContext) -> MaskFacts:
    """What the ordered mask ops of one site prove, evaluated at the example inputs."""
    facts = MaskFacts()
    for index, op in enumerate(ops):
        facts.op_index, facts.fill = index, None if op.kind == "add" else scalar_of(op.value, ctx)
        facts.replacing = op.kind in ("fill", "keep")
        if op.kind == "scale":
            _apply_scale(facts, op, ctx)
        elif op.kind in ("fill", "keep") and not is_number(op.value):
            facts.dense_reason = "masked_fill/where with a tensor fill value"
        else:
            _apply_mask_op(facts, op, ctx)
    return facts


def empty_row_rule(facts: MaskFacts) -> str:
    """What eager gives on a row whose every key is blocked (see EMPTY_ROW_RULES)."""
    fills = set(facts.fills.values())
    if facts.dense_reason:
        return "unknown"
    if fills == {float("-inf")}:
        return "neginf"  # -inf stays -inf whichever way the ops combine
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
