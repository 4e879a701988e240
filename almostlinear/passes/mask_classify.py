"""Classifying what a site's mask ops proved (`classify_at`): the static allowed set and bias as a
structure (none, causal, window band, per-key, ALiBi), combined with the per-key data terms."""
from __future__ import annotations

from typing import Sequence

import torch

from ..kinds import MaskKind
from .graph_utils import concrete_int
from .mask_alibi import alibi_slopes
from .mask_ops import MaskContext, MaskOp, MaskSpec
from .mask_terms import MaskFacts, collect_facts, empty_row_rule


def classify_at(ops: Sequence[MaskOp], scores_shape: tuple | None, ctx: MaskContext) -> tuple[MaskSpec, MaskFacts]:
    """The mask of one site at the example size (`ctx.example_inputs`), and the facts it was proved from."""
    facts = collect_facts(ops, ctx)
    spec = combine(facts, scores_shape)
    spec.empty_rows_possible = bool(facts.key_terms) or facts.data_dependent or bool(facts.dense_reason) or (
        facts.allowed is not None and not bool(facts.allowed.any(dim=-1).all())
    )
    spec.empty_row_rule = empty_row_rule(facts) if spec.empty_rows_possible else "none"
    return spec, facts


def combine(facts: MaskFacts, scores_shape: tuple | None) -> MaskSpec:
    """The static structure, with the data-dependent per-key terms added to it."""
    if facts.dense_reason:
        return MaskSpec(kind=MaskKind.DENSE, reason=facts.dense_reason)
    structure = classify_static(facts.allowed, facts.bias, scores_shape)
    if structure.kind == MaskKind.DENSE:
        return structure
    if facts.key_terms:
        if structure.kind in (MaskKind.NONE, MaskKind.KEY_PADDING):
            structure.kind = MaskKind.KEY_PADDING
        elif structure.kind in (MaskKind.CAUSAL, MaskKind.CAUSAL_KEY_PADDING):
            structure.kind = MaskKind.CAUSAL_KEY_PADDING
        elif structure.kind in (MaskKind.WINDOW, MaskKind.CAUSAL_WINDOW):
            pass  # sliding-window layers on a padded batch: the band, with the key weight (the kind says window)
        else:
            return MaskSpec(kind=MaskKind.DENSE, reason=f"{structure.kind} combined with a data-dependent key mask")
        structure.key_mask = list(facts.key_terms)
        structure.reason = "key mask broadcasts over the query dim"
    return structure


def rows_cols(shape: tuple | None) -> tuple[int, int] | None:
    """The example size of the scores' last two dims (without a guard); None when unknown."""
    if shape is None or len(shape) < 2:
        return None
    rows, cols = concrete_int(shape[-2]), concrete_int(shape[-1])
    return None if rows is None or cols is None else (rows, cols)


def classify_static(allowed: torch.Tensor | None, bias: torch.Tensor | None, scores_shape: tuple | None) -> MaskSpec:
    """Classify concrete mask values broadcast to the scores' last two dims [L, S]."""
    if allowed is None and bias is None:
        return MaskSpec(kind=MaskKind.NONE, reason="no mask")
    rc = rows_cols(scores_shape)
    if rc is None:
        return MaskSpec(kind=MaskKind.DENSE, reason="scores have no static shape")
    L, S = rc
    if L == 0 or S == 0:  # an empty sequence (a call with no tokens): nothing to see, nothing to compute
        return MaskSpec(kind=MaskKind.DENSE, reason=f"the scores are empty ([L, S] = [{L}, {S}]): no structure to prove")
    ones = torch.ones(L, S, dtype=torch.bool)
    allowed = ones if allowed is None else torch.broadcast_to(allowed, allowed.shape[:-2] + (L, S)) & ones
    bias_full = None if bias is None else torch.broadcast_to(bias, bias.shape[:-2] + (L, S)).float()
    # All leading (batch, head) slices must share one structure for the kinds below.
    flat = allowed.reshape(-1, L, S)
    if not bool((flat == flat[:1]).all()):
        return MaskSpec(kind=MaskKind.DENSE, reason="mask structure differs across batch or heads")
    slopes = None
    if bias_full is not None and bool((bias_full != 0).any()):
        slopes = alibi_slopes(bias_full, allowed, L, S)
        if slopes is None:
            return MaskSpec(kind=MaskKind.DENSE, reason="additive bias is not ALiBi-shaped (m*(j-i) per head)")
    spec = _allowed_structure(flat[0], L, S)
    if slopes is None or spec.kind == MaskKind.DENSE:
        return spec
    if spec.kind not in (MaskKind.NONE, MaskKind.CAUSAL):
        return MaskSpec(kind=MaskKind.DENSE, reason=f"ALiBi bias combined with a {spec.kind} mask")
    return MaskSpec(kind=MaskKind.ALIBI, causal=spec.causal, alibi_slopes=slopes, reason="bias m*(j-i) per head")


def _allowed_structure(pattern: torch.Tensor, L: int, S: int) -> MaskSpec:
    """The structure of one [L, S] allowed pattern: all, causal, a band, the same keys for every query
    (with or without causal), else dense."""
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    static_keys = None
    if bool(pattern.all()):
        kind, causal, window = MaskKind.NONE, False, 0
    elif L == S and bool((pattern == (j <= i)).all()):
        kind, causal, window = MaskKind.CAUSAL, True, 0
    else:
        band = _band_width(pattern, i, j, L, S)
        if band is not None:
            kind, causal, window = band
        elif bool((pattern == pattern[:1]).all()):  # the same keys removed for every query
            kind, causal, window, static_keys = MaskKind.KEY_PADDING, False, 0, pattern[0].clone()
        elif L == S and bool((pattern == ((j <= i) & pattern[-1:])).all()):
            kind, causal, window, static_keys = MaskKind.CAUSAL_KEY_PADDING, True, 0, pattern[-1].clone()
        else:
            return MaskSpec(kind=MaskKind.DENSE, reason="mask is not causal, banded or per-key")
    return MaskSpec(kind=kind, causal=causal, window=window, static_keys=static_keys,
                    reason=f"proved from mask values ({kind})")


def _band_width(pattern, i, j, L, S) -> tuple[MaskKind, bool, int] | None:
    if L != S:
        return None
    for causal in (True, False):
        # width w: the number of allowed keys in the last row (causal: i - w < j <= i) or in the first row
        # (|i - j| < w: keys 0..w-1; a window wider than half the length still fits there)
        width = int(pattern[-1].sum().item()) if causal else int(pattern[0].sum().item())
        if width <= 0 or width >= S:
            continue
        band = (j <= i) & (j > i - width) if causal else ((i - j).abs() < width)
        if bool((pattern == band).all()):
            return (MaskKind.CAUSAL_WINDOW if causal else MaskKind.WINDOW), causal, width
    return None
