"""The data of mask analysis: the operations between the score matmul and the softmax (`MaskOp`), what the
analysis proved about their combination (`MaskSpec`, `KeyTerm`), and what it reads the graph with
(`MaskContext`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx

from ..kinds import MaskKind

# An additive value below this removes a key: exp(-200) underflows to 0 in fp32 and bf16 (and fp16).
BLOCKED_BELOW = -200.0

# Eager's value on a fully masked row: "neginf" (every blocking value is -inf: softmax gives NaN, SDPA 0, see
# MaskSpec.neginf_row), "uniform" (every entry of such a row
# holds the same finite value, e.g. HF's where(allowed, 0, finfo.min): the mean of all values), "argmax" (one
# additive per-key term: the mean of the values at the keys with the largest mask value), "unknown" (several
# finite blocking ops: depends on how they combine), "none" (proved impossible).
EMPTY_ROW_RULES = ("none", "neginf", "uniform", "argmax", "unknown")


@dataclass
class MaskOp:
    """One operation between the score matmul and the softmax.

    kind: "scale" (scores * factor), "add" (scores + tensor), "fill" (where(cond, value, scores)),
          "keep" (where(cond, scores, value)).
    """

    kind: str
    node: fx.Node | None  # the graph node applying the operation (None: a term split from another op)
    tensor: Any = None  # the additive tensor, or the boolean condition
    value: Any = None  # the scale factor, the fill value, or (add) a constant factor on the tensor
    divide: bool = False  # scale given as a division


@dataclass
class KeyTerm:
    """A data-dependent per-key mask term, proved to broadcast over the query dim ([..., 1, S]).

    kind: "allowed" (bool, True keeps the key), "blocked" (bool, True removes it) or "additive" (float
    added to the scores, times `factor` for scale ops applied after it).
    """

    node: fx.Node
    kind: str
    factor: float = 1.0


@dataclass
class MaskSpec:
    kind: MaskKind = MaskKind.NONE
    causal: bool = False
    window: int = 0
    key_mask: list[KeyTerm] = field(default_factory=list)  # data-dependent per-key additive/bool terms
    # Static keys removed for every query (a constant/buffer mask proved per-key): bool [S], True = kept.
    # The polynomial rewrite turns it into a key weight; dropping it would let masked values through.
    static_keys: torch.Tensor | None = None
    alibi_slopes: list[float] | None = None
    reason: str = ""  # why the mask is dense (or how it was proved)
    empty_rows_possible: bool = True  # False only when proved that every query keeps at least one key
    # What eager gives on a row whose every key is blocked (softmax of equal or -inf values), see
    # EMPTY_ROW_RULES; the polynomial rewrite reproduces "neginf", "uniform" and "argmax", else stays exact.
    empty_row_rule: str = "unknown"
    # The value of a row whose every score is -inf in the code that was matched: NaN for an eager softmax chain
    # (exp(-inf - -inf)), 0 for F.scaled_dot_product_attention (torch >= 2.5 returns 0 there, gradient 0).
    neginf_row: float = math.nan


@dataclass
class MaskContext:
    """What mask analysis reads the graph with: the module, its data-flow graph (`to_networkx`), the kind
    of each placeholder (`placeholder_kinds`) and the example inputs static parts are evaluated on."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    kinds: dict
    example_inputs: Sequence[Any]
