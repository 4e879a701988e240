"""Dynamic shapes: whether a static mask proved at the example length has the same structure at every
length (`holds_at_other_lengths`), by re-evaluating it at probe lengths."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import sympy
import torch

from .graph_utils import concrete_int
from .mask_alibi import alibi_slopes
from .mask_classify import classify_at, rows_cols
from .mask_ops import MaskContext, MaskOp, MaskSpec
from .mask_terms import MaskFacts

PROBE_CAP = 4096  # the largest length a mask is re-evaluated at (a [4096, 4096] mask: 16 M elements)


def holds_at_other_lengths(spec: MaskSpec, ops: Sequence[MaskOp], scores_shape: tuple, ctx: MaskContext) -> bool:
    """Whether the static mask has this structure at other lengths: re-evaluated with the symbolic lengths
    set to probe values (2, 3, about half, one less, one more, twice the example, and the largest length
    up to PROBE_CAP where it can be built, so a sliced buffer is checked whole), each compared with what
    the structure predicts at that size. A length where the mask cannot be built (a buffer sliced past its
    end) is a length eager cannot run either. A static per-key mask is a pattern of this length only.
    A probe that cannot be built at all answers False (specialise: correct, one graph per length)."""
    if spec.kind == "dense" or spec.static_keys is not None:
        return spec.kind == "dense"  # a dense mask is kept exact at every length: nothing to prove
    try:
        return _holds_at_probes(spec, ops, scores_shape, ctx)
    except Exception:  # noqa: BLE001 - a probe we cannot build
        return False


def _holds_at_probes(spec: MaskSpec, ops: Sequence[MaskOp], scores_shape: tuple, ctx: MaskContext) -> bool:
    symbols = {sym for d in scores_shape[-2:] if isinstance(d, torch.SymInt) for sym in d.node.expr.free_symbols}
    hints = _symbol_hints(ctx, symbols)
    if hints is None:
        return False
    h = max(hints.values())

    @functools.lru_cache(maxsize=None)  # the binary search and the cap probe revisit lengths
    def at(length: int) -> bool | None:
        """Whether the mask at this length is what `spec` predicts; None where it cannot be built."""
        probe = {sym: length for sym in hints}
        shape = tuple(_substitute(d, probe) for d in scores_shape)
        try:
            probe_ctx = MaskContext(ctx.gm, ctx.graph, ctx.kinds, _probe_inputs(ctx, probe))
            _, facts = classify_at(ops, shape, probe_ctx)
        except Exception:  # noqa: BLE001 - not evaluable at this length: eager fails there too
            return None
        return None if facts.dense_reason else _predicted_by(spec, facts, *rows_cols(shape))

    results = [at(n) for n in sorted({2, 3, h // 2 + 1, max(2, h - 1), h + 1, 2 * h + 1})]
    results.append(at(_largest_evaluable(at, h)))
    return all(r is not False for r in results) and any(r for r in results)


def _largest_evaluable(at, h: int) -> int:
    """PROBE_CAP, or the largest length in (h, cap) where the mask can be built (a buffer's full extent)."""
    if at(PROBE_CAP) is not None:
        return PROBE_CAP
    lo, hi = h, PROBE_CAP
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid) is not None else (lo, mid)
    return lo


def _predicted_by(spec: MaskSpec, facts: MaskFacts, L: int, S: int) -> bool:
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
    slopes = alibi_slopes(bias, allowed.reshape(bias.shape[:-2] + (L, S)) if allowed.shape[0] > 1 else allowed[0],
                          L, S) if L > 1 else spec.alibi_slopes
    return slopes is not None and len(slopes) == len(spec.alibi_slopes) and all(
        math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(slopes, spec.alibi_slopes))


def _placeholders_with_examples(ctx: MaskContext):
    return zip([n for n in ctx.gm.graph.nodes if n.op == "placeholder"], ctx.example_inputs)


def _symbol_hints(ctx: MaskContext, symbols: set) -> dict | None:
    """The example value of every symbol, read from the placeholders' fake shapes and the example inputs."""
    hints = {}
    for node, example in _placeholders_with_examples(ctx):
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


def _probed(d: Any, probe: dict) -> bool:
    return isinstance(d, torch.SymInt) and bool(d.node.expr.free_symbols & set(probe))


def _probe_inputs(ctx: MaskContext, probe: dict) -> list:
    """The example inputs with every dim of a probed symbol resized (zeros: only shapes matter here)."""
    inputs = []
    for node, example in _placeholders_with_examples(ctx):
        fake = node.meta.get("example_value")
        if isinstance(fake, torch.SymInt) and isinstance(example, (int, torch.SymInt)):
            inputs.append(_substitute(fake, probe))
        elif isinstance(fake, torch.Tensor) and isinstance(example, torch.Tensor) and any(
                _probed(d, probe) for d in fake.shape):
            shape = [_substitute(d, probe) if _probed(d, probe) else int(real)
                     for d, real in zip(fake.shape, example.shape)]
            inputs.append(torch.zeros(shape, dtype=example.dtype, device=example.device))
        else:
            inputs.append(example)
    return inputs
