"""Mask structure analysis: what an attention site's mask is, proved from the graph.

A site's scores pass through an ordered list of mask operations (`MaskOp`) between the score matmul and
the softmax: additive terms, `masked_fill`, `where`. Each mask tensor is classified by what it depends on:

* only shapes, buffers and constants (a causal buffer slice, `arange` comparisons, `tril`): it is
  evaluated on the example inputs and its values are classified (causal, window band, key-only, ALiBi);
* user data (a padding `attention_mask`): it is classified only when its shape proves the structure,
  i.e. it broadcasts over the query dimension, so it is a per-key mask; anything else is `dense`.

The combined `MaskSpec.kind` is a `MaskKind`. Only the structured kinds can be approximated.

The steps live in their own modules: `mask_ops` (the data), `mask_terms` (what each op contributes),
`mask_classify` (the structure of the combination), `mask_probe` (dynamic shapes); `analyze` runs them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .mask_classify import classify_at
from .mask_ops import BLOCKED_BELOW, EMPTY_ROW_RULES, KeyTerm, MaskContext, MaskOp, MaskSpec
from .mask_probe import holds_at_other_lengths


def analyze(ops: Sequence[MaskOp], scores_shape: tuple | None, ctx: MaskContext) -> MaskSpec:
    """Classify the combined mask of one site from its ordered mask operations.

    With symbolic lengths (dynamic shapes) the static parts are evaluated at the example size and at probe
    sizes (see `holds_at_other_lengths`); a structure that holds at every size stays symbolic, anything
    else specialises the lengths (a guard: Dynamo recompiles for another length, never runs a wrong mask).
    """
    spec, facts = classify_at(ops, scores_shape, ctx)
    has_static = facts.allowed is not None or facts.bias is not None
    lengths = [d for d in (scores_shape or ())[-2:] if isinstance(d, torch.SymInt)]
    if lengths and has_static and not holds_at_other_lengths(spec, ops, scores_shape, ctx):
        for d in lengths:
            int(d)  # guard on the example length: this mask's structure was proved at this size only
        spec.reason += " (specialised to this length: the structure is not the same at other lengths)"
    return spec


__all__ = ["analyze", "BLOCKED_BELOW", "EMPTY_ROW_RULES", "KeyTerm", "MaskContext", "MaskOp", "MaskSpec"]
