"""The polynomial rewrite: a site becomes one call of torch.ops.almostlinear.poly_attention (or, where its mode
is chosen at run time, torch.ops.almostlinear.switchable_attention). The pass knows the ops only by name.

    out, state = poly_attention(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window)
    out, state, aux, band = poly_window_attention(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal,
                                            window, exact_window)          (an exact window)
    out, mode, lse = switchable_attention(q, k, v, key_weight, alibi_slopes, switch, scale, coefficients,
                                          causal, window)

q [B, Hq, L, D]; the *unrepeated* k/v [B, Hk, S, D] for grouped-query attention; key_weight [B, S] float32, the
product of the key masks the matcher proved; alibi_slopes [Hq]. Output 0 replaces the site's output (output 1
is what the op's backward reuses). The switch is a 0-d int8 (1: polynomial, 0: exact): a buffer the re-checks
flip, and/or `key length >= min_seq_len` for a site whose key length is dynamic.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from .builder import NodeBuilder
from .graph_utils import concrete_int, example_value, is_number, shape_of, tensor_meta
from .site import AttentionSite
from .rewrite import RewriteError, replace_output, scaled_query

def alibi_per_query_head(site: AttentionSite) -> list[float] | None:
    """The ALiBi slopes as one per query head: a bias shared by all heads ([L, S]) has one slope, a bias
    with a batch dim has B * Hq (used only when every batch element has the same slopes)."""
    slopes = list(site.mask.alibi_slopes)
    heads = concrete_int(shape_of(site.q)[1])
    if heads is None:
        return None
    if len(slopes) == 1:
        return slopes * heads
    if len(slopes) % heads == 0 and all(slopes[i] == slopes[i % heads] for i in range(len(slopes))):
        return slopes[:heads]
    return None


def is_dynamic_length(site: AttentionSite) -> bool:
    """The key length is a symbol (dynamic shapes): the crossover is applied at run time."""
    k_shape = shape_of(site.op_kv[0])
    return k_shape is not None and isinstance(k_shape[-2], torch.SymInt) and not k_shape[-2].node.is_constant()


def static_keys_name(site_id: int) -> str:
    return f"_almostlinear_static_keys_{site_id}"


def term_key_weight(leaf: torch.Tensor, kind: str, factor: float) -> torch.Tensor:
    """The float32 weight [B or 1, S] of one proved key term ([B or 1, 1, 1, S]): "allowed" keeps keys where the
    mask is non-zero, "blocked" where it is zero, "additive" weighs by exp(factor * mask) (finfo.min and -inf
    give 0). Called in the rewritten graph and, on captured values, by calibration."""
    if kind == "allowed":
        w = leaf != 0
    elif kind == "blocked":
        w = leaf == 0
    else:
        w = torch.exp(leaf.to(torch.float32) * factor)
    return w.to(torch.float32).flatten(0, -2)


def static_key_weight(site: AttentionSite) -> torch.Tensor | None:
    """The static per-key mask (a buffer or constant mask that removes the same keys for every query) as a
    [1, S] float32 weight on the device of q, or None where there is none (or it keeps every key)."""
    keys = site.mask.static_keys
    if keys is None or bool(keys.all()):
        return None
    return keys.reshape(1, -1).to(device=tensor_meta(site.q).device, dtype=torch.float32)


def key_weight_node(site: AttentionSite, q: fx.Node, build: NodeBuilder) -> fx.Node | None:
    """The per-key weight [B, S] (float32): product of the proved key terms and of the static key mask (held
    by the graph module as a buffer)."""
    weight = None
    static = static_key_weight(site)
    if static is not None:
        weight = build.buffer(static_keys_name(site.id), static)
    for term in site.mask.key_mask:
        w = build.call(term_key_weight, term.node, term.kind, float(term.factor))
        weight = w if weight is None else build.call(operator.mul, weight, w)
    if weight is None:
        return None
    batch_ones = build.call(torch.ones_like, build.call(operator.getitem, q, (slice(None), 0, 0, slice(0, 1))), dtype=torch.float32)
    return build.call(operator.mul, weight, batch_ones)  # broadcast a [1, S] mask to [B, S]


def _empty_bands(site: AttentionSite, key_weight: fx.Node, build: NodeBuilder) -> fx.Node:
    """bool [B, S]: the rows whose window band (causal: i - w < j <= i; else |i - j| < w; L = S) holds no key of
    weight > 0, from a running count of the kept keys read at each band's ends (two index buffers, O(B * S))."""
    S, w = concrete_int(shape_of(key_weight)[-1]), int(site.mask.window)
    if S is None:
        raise RewriteError("a window with a data-dependent key mask at a dynamic length: the rows whose band holds "
                           "no key cannot be found ahead")
    i = torch.arange(S)
    lo = (i - w + 1).clamp_min(0)
    hi = i if site.mask.causal else (i + w - 1).clamp_max(S - 1)
    device = tensor_meta(site.q).device
    kept = build.method("to", build.call(operator.ne, key_weight, 0), torch.float32)
    count = build.call(torch.nn.functional.pad, build.method("cumsum", kept, -1), (1, 0))  # [B, S + 1]
    ends = [build.method("index_select", count, -1, build.buffer(f"_almostlinear_band_{name}_{site.id}", index.to(device)))
            for name, index in (("hi", hi + 1), ("lo", lo))]
    return build.call(operator.eq, build.call(operator.sub, *ends), 0)


def _eager_empty_rows(site: AttentionSite, out: fx.Node, key_weight: fx.Node, v: fx.Node, build: NodeBuilder) -> fx.Node:
    """Rows whose every key is masked: the op gives 0, the matched code gives softmax of equal (or -inf) values.
    Give them the matched code's value (the mask's EMPTY_ROW_RULES): for -inf rows `neginf_row` (eager softmax:
    NaN; SDPA: 0), else the mean of all values, or the mean of the values at the keys with the largest mask
    value. O(B * S * Dv); the gradient reaches v (as in eager) and not q or k (the row does not depend on them; an
    additive finfo.min mask makes eager report a rounding artefact there)."""
    rule, neginf = site.mask.empty_row_rule, float(site.mask.neginf_row)
    if site.mask.window:  # row i is empty when every key of its band has weight 0
        empty = build.method("unsqueeze", build.method("unsqueeze", _empty_bands(site, key_weight, build), 1), -1)
    elif site.mask.causal:  # row i is empty when keys 0..i all have weight 0
        empty = build.call(operator.eq, build.method("cumsum", key_weight, -1), 0)
        empty = build.method("unsqueeze", build.method("unsqueeze", empty, 1), -1)  # [B, 1, S, 1]
    else:
        empty = build.call(operator.eq, build.method("sum", key_weight, -1), 0)
        empty = build.method("reshape", empty, (-1, 1, 1, 1))  # [B, 1, 1, 1]
    if rule == "neginf":
        return build.call(torch.where, empty, neginf, out)
    groups = concrete_int(shape_of(site.q)[1]) // concrete_int(shape_of(v)[1])
    if rule == "uniform":
        fallback = build.method("mean", v, -2, keepdim=True)  # [B, Hk, 1, Dv]
    else:  # "argmax": one additive key term
        term = site.mask.key_mask[0]
        m = build.call(operator.mul, build.method("to", term.node, torch.float32), float(term.factor))
        m = build.method("flatten", m, 0, -2)  # [B or 1, S]
        top = build.method("amax", m, -1, keepdim=True)
        chosen = build.method("to", build.call(operator.eq, m, top), tensor_meta(v).dtype)
        summed = build.call(torch.einsum, "bs,bhsd->bhd", chosen, v)
        count = build.method("sum", chosen, -1)
        fallback = build.call(operator.truediv, summed, build.method("reshape", count, (-1, 1, 1)))
        fallback = build.method("unsqueeze", fallback, -2)  # [B, Hk, 1, Dv]
        no_key = build.method("reshape", build.call(operator.eq, top, float("-inf")), (-1, 1, 1, 1))
        fallback = build.call(torch.where, no_key, neginf, fallback)
    if groups > 1:
        fallback = build.method("repeat_interleave", fallback, groups, 1)
    fallback = build.method("to", fallback, tensor_meta(out).dtype)
    return build.call(torch.where, empty, fallback, out)


def switch_name(site_id: int) -> str:
    return f"_almostlinear_switch_{site_id}"


MIN_LEN_PREFIX = "_almostlinear_min_seq_len_"


def min_len_name(site_id: int) -> str:
    return f"{MIN_LEN_PREFIX}{site_id}"


def guard_name(site_id: int) -> str:
    return f"_almostlinear_logit_limit_{site_id}"


def head_logit_bounds(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 [Hk]: per key/value head, |scale| * max_i |q_i| * max_j |k_j| >= |scale q_i.k_j| (its query heads
    together; q [B, Hq, L, D], k [B, Hk, S, D]). Two row-norm reductions, O(B * H * n * d); a zero row is padded
    in so that an empty batch reduces to 0. Called in the rewritten graph (the guard) and, on captured values, by
    the search (rewriter/guard.py)."""
    qn, kn = (torch.nn.functional.pad(torch.linalg.vector_norm(x.float(), dim=-1), (0, 1, 0, 0, 0, 1)).amax((0, 2))
              for x in (q, k))
    return qn.reshape(k.shape[1], -1).amax(1) * kn * abs(float(scale))


def _within_guard(site: AttentionSite, build: NodeBuilder, q: fx.Node, k: fx.Node, scale: float,
                  limits: Sequence[float]) -> fx.Node:
    """int8 [Hk]: 1 where this call's `head_logit_bounds` stay within the heads' limits (a buffer), 0 where a
    head must run exact."""
    bound = build.call(head_logit_bounds, q, k, float(scale))
    device = tensor_meta(site.q).device
    limit = build.buffer(guard_name(site.id), torch.tensor(list(limits), dtype=torch.float32, device=device))
    return build.method("to", build.call(operator.le, bound, limit), torch.int8)


def _switch(site: AttentionSite, build: NodeBuilder, switchable: bool, min_seq_len: int | None,
            k: fx.Node, heads: Sequence[int] | None, guard: fx.Node | None = None) -> fx.Node | None:
    """The int8 mode of the switchable op (1: polynomial, 0: exact), or None for the plain op.

    switchable (re-checks on) or per-head decisions (`heads`: the key/value heads the op computes): a buffer
    [Hk] with 1 at `heads` (all heads: every entry), that the re-checks may flip head by head. Dynamic key length (`min_seq_len` given): the
    length is compared in the graph with a 0-d int64 buffer holding min_seq_len (the budget search sets it to 0
    while it measures, so the approximation is measured even on an example shorter than the crossover), so
    one graph serves every length without a guard on it."""
    device = tensor_meta(site.q).device
    switch = None
    if heads is not None or switchable or guard is not None:  # one mode per key/value head
        modes = torch.zeros(shape_of(k)[1], dtype=torch.int8, device=device)
        modes[list(heads) if heads is not None else slice(None)] = 1
        switch = build.buffer(switch_name(site.id), modes)
    if min_seq_len is not None:
        minimum = build.buffer(min_len_name(site.id), torch.tensor(min_seq_len, dtype=torch.int64, device=device))
        length = build.method("size", k, -2)
        full = build.call(torch.full, (), length, dtype=torch.int64, device=device)
        gate = build.method("to", build.call(operator.ge, full, minimum), torch.int8)
        switch = gate if switch is None else build.call(operator.mul, switch, gate)
    if guard is not None:  # heads whose logit bound leaves the planned range run exact on this call
        switch = build.call(operator.mul, switch, guard)
    return switch


def alibi_node(site: AttentionSite, build: NodeBuilder) -> fx.Node | None:
    if site.mask.alibi_slopes is None:
        return None
    device = tensor_meta(site.q).device
    return build.call(torch.tensor, alibi_per_query_head(site), dtype=torch.float32, device=device)


def op_query(site: AttentionSite, build: NodeBuilder) -> tuple[fx.Node, float]:
    if site.form != "sdpa":
        return scaled_query(site, build)
    if not is_number(site.scale):
        raise RewriteError("SDPA scale is not a constant")
    return site.q, float(site.scale)


def rewrite_polynomial(gm: fx.GraphModule, site: AttentionSite, fake_mode, coefficients: Sequence[float],
                       switchable: bool = False, min_seq_len: int | None = None,
                       heads: Sequence[int] | None = None, guard: Sequence[float] | None = None,
                       exact_window: int = 0) -> fx.Node:
    """Replace the site with the polynomial op P(s) = sum_j coefficients[j] s^j. `switchable`: the mode is a
    buffer the re-checks flip; `min_seq_len` (dynamic key length only): the op runs from that key length on,
    exact attention below; `heads`: the key/value heads the op computes (GQA: with their query heads), exact
    attention on the others (None: all); `guard`: per key/value head, the logit bound |scale| max|q| max|k| above
    which the head runs exact on a call (rewriter/guard.py); `exact_window` > 0: exact softmax weights on each
    query's nearest keys, P(s) on the others (torch.ops.almostlinear.poly_window_attention). Returns the op node
    (its output 0 is the attention output)."""
    build = NodeBuilder(gm, site.output, fake_mode, source=site.anchor)
    q, scale = op_query(site, build)
    k, v = site.op_kv
    mask = site.mask
    alibi = alibi_node(site, build)
    key_weight = key_weight_node(site, q, build)
    within = _within_guard(site, build, q, k, scale, guard) if guard is not None else None
    switch = _switch(site, build, switchable, min_seq_len, k, heads, within)
    tail = (list(coefficients), bool(mask.causal), int(mask.window))
    if switch is not None:
        op_node = build.call(torch.ops.almostlinear.switchable_attention.default, q, k, v, key_weight, alibi, switch,
                             scale, *tail, *((exact_window,) if exact_window else ()))
    else:
        # keep_states: the causal op keeps its per-chunk states for a backward that will come (the site's output
        # needs grad in the traced example); a memory-for-time trade only, the result is the same
        keep = bool(getattr(example_value(site.output), "requires_grad", False))
        if exact_window:
            op_node = build.call(torch.ops.almostlinear.poly_window_attention.default, q, k, v, key_weight, alibi,
                                 scale, *tail, exact_window, keep_states=keep)
        else:
            op_node = build.call(torch.ops.almostlinear.poly_attention.default, q, k, v, key_weight, alibi, scale,
                                 *tail, keep_states=keep)
    out = build.getitem(op_node, 0)
    if mask.empty_rows_possible and key_weight is not None:
        out = _eager_empty_rows(site, out, key_weight, v, build)
    replace_output(gm, site, out, build)
    return op_node


__all__ = ["rewrite_polynomial", "alibi_per_query_head", "is_dynamic_length", "term_key_weight",
           "head_logit_bounds", "static_key_weight", "switch_name", "min_len_name", "MIN_LEN_PREFIX", "static_keys_name"]
