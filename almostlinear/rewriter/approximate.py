"""Approximate sites: which ones the polynomial op supports, and the rewrite to torch.ops.almostlinear.*

The rewritten node calls `torch.ops.almostlinear.poly_attention(q, k, v, key_weight, alibi_slopes, scale,
coefficients, causal, window)` with q [B, Hq, L, D] and the *unrepeated* k/v [B, Hk, S, D] for
grouped-query attention, and takes output 0 (output 1 is the state the op's backward reuses). Key masks
proved by the matcher become a per-key weight [B, S].
"""
from __future__ import annotations

import operator


import torch
import torch.fx as fx

from ..kernels import MASK_KINDS as OP_MASK_KINDS
from ..kernels import default_min_seq_len, feature_rank, taylor_coefficients
from ..passes.graph_utils import concrete_int, is_number, shape_of, tensor_meta
from ..passes.match import AttentionSite
from ..passes.rewrite import RewriteError, _Builder, _scaled_query, replace_output
from .options import Options

POLY_OP = torch.ops.almostlinear.poly_attention.default
CUDA_FP32_MIN_SEQ_LEN = 12288


def _dropout_active(site: AttentionSite) -> bool:
    p = site.dropout_p
    if site.form == "eager" and site.dropout_training is False:
        return False
    return not (is_number(p) and p == 0)


def min_seq_len_for(site: AttentionSite, options: Options) -> int:
    """The key length from which the op is faster than exact attention at this site.

    The crossover tables are measured at head dim 64 (benchmarks/attention.py). By FLOPs it would move as
    d^2; measured on the 2-core CPU (causal, fwd+bwd, 4 heads) it moves about linearly in d: d=16 ~6k,
    d=32 ~8k, d=64 ~16k, so the table value is scaled by d/64.
    """
    if options.min_seq_len is not None:
        return options.min_seq_len
    q = tensor_meta(site.q)
    base = default_min_seq_len(q.device if q is not None else "cpu", causal=site.mask.causal)
    if q is not None and q.device.type == "cuda" and q.dtype == torch.float32:
        # fp32 has no flash kernel: measured with benchmarks/gpu_e2e.py on an H200 (GPT, d=64, causal), a
        # training step through the op is 0.86x at 8k, 1.6x at 16k, 2.8x at 32k; the table is for bf16 flash
        base = CUDA_FP32_MIN_SEQ_LEN
    d = concrete_int(q.shape[-1]) if q is not None else 64
    return max(256, int(base * (d or 64) / 64))


def _alibi_per_query_head(site: AttentionSite) -> list[float] | None:
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


def polynomial_support(site: AttentionSite, options: Options) -> tuple[bool, str]:
    """Whether the op can compute this site, and the reason (kept in the report either way)."""
    if site.score_transform:  # the op computes P(s) of the plain scores: never drop a transform
        return False, f"the scores pass through a transform the op cannot apply: {site.score_transform}"
    if site.mask.kind not in OP_MASK_KINDS:
        return False, f"mask kind {site.mask.kind!r} has no linear-time structure ({site.mask.reason})"
    q_shape, k_shape = shape_of(site.q), shape_of(site.op_kv[0])
    if q_shape is None or len(q_shape) != 4:
        return False, "the polynomial op takes [B, H, T, D] tensors; this site is not 4-D"
    if _dropout_active(site):
        if isinstance(site.dropout_p, fx.Node):  # dynamic=True: Dynamo passes float attributes as inputs
            return False, ("dropout's probability is a run-time value here (Dynamo does not specialise floats: "
                           "torch._dynamo.config.specialize_float is False), so it may change without a recompile "
                           "and the op has no dropout; with specialize_float = True a p of 0.0 is a constant")
        return False, "dropout on the attention weights is not supported by the polynomial op"
    if site.mask.alibi_slopes is not None and _alibi_per_query_head(site) is None:
        return False, (f"the ALiBi bias has {len(site.mask.alibi_slopes)} slopes, not one per query head "
                       f"({q_shape[1]}) or one for all")
    if site.mask.empty_rows_possible and site.mask.empty_row_rule not in ("nan", "uniform", "argmax", "none"):
        return False, ("rows with every key masked may occur (the mask depends on data) and eager's value on them "
                       "depends on how several finite masks combine: kept exact, which gives eager's value")
    for term in site.mask.key_mask:
        shape = shape_of(term.node)
        if shape is None or any(concrete_int(d) != 1 for d in shape[1:-1]):
            return False, "the key mask differs across heads (the op takes one weight per batch and key)"
    length = concrete_int(k_shape[-2])
    threshold = min_seq_len_for(site, options)
    if length is None:
        return False, "unbacked symbolic key length: the crossover cannot be decided"
    if is_dynamic_length(site):
        return True, (f"polynomial where the key length >= min_seq_len {threshold}, exact below (dynamic length: "
                      f"chosen at run time)")
    if length < threshold:
        return False, f"key length {length} < min_seq_len {threshold}: exact attention is faster there"
    return True, f"polynomial (key length {length} >= min_seq_len {threshold})"


def static_keys_name(site_id: int) -> str:
    return f"_almostlinear_static_keys_{site_id}"


def _static_key_weight(gm: fx.GraphModule, site: AttentionSite, build: _Builder, fake_mode) -> fx.Node:
    """The static per-key mask (a buffer or constant mask that removes the same keys for every query) as a
    [1, S] float32 weight, held by the graph module as a buffer."""
    device = tensor_meta(site.q).device
    weight = site.mask.static_keys.reshape(1, -1).to(device=device, dtype=torch.float32)
    return _buffer(gm, static_keys_name(site.id), weight, build, fake_mode)


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


def _key_weight(gm: fx.GraphModule, site: AttentionSite, q: fx.Node, build: _Builder, fake_mode) -> fx.Node | None:
    """The per-key weight [B, S] (float32): product of the proved key terms and of the static key mask."""
    weight = None
    if site.mask.static_keys is not None and not bool(site.mask.static_keys.all()):
        weight = _static_key_weight(gm, site, build, fake_mode)
    for term in site.mask.key_mask:
        w = build.call(term_key_weight, (term.node, term.kind, float(term.factor)))
        weight = w if weight is None else build.call(operator.mul, (weight, w))
    if weight is None:
        return None
    batch_ones = build.call(torch.ones_like, (build.call(operator.getitem, (q, (slice(None), 0, 0, slice(0, 1)))),),
                            {"dtype": torch.float32})
    return build.call(operator.mul, (weight, batch_ones))  # broadcast a [1, S] mask to [B, S]


def _eager_empty_rows(site: AttentionSite, out: fx.Node, key_weight: fx.Node, v: fx.Node, build: _Builder) -> fx.Node:
    """Rows whose every key is masked: the op gives 0, eager gives softmax of equal (or -inf) values. Give them
    eager's value (the mask's EMPTY_ROW_RULES): NaN, the mean of all values, or the mean of the values at the
    keys with the largest mask value. O(B * S * Dv); the gradient reaches v (as in eager) and not q or k (the row
    does not depend on them; an additive finfo.min mask makes eager report a rounding artefact there)."""
    rule = site.mask.empty_row_rule
    if site.mask.causal:  # row i is empty when keys 0..i all have weight 0
        empty = build.call(operator.eq, (build.method("cumsum", (key_weight, -1)), 0))
        empty = build.method("unsqueeze", (build.method("unsqueeze", (empty, 1)), -1))  # [B, 1, S, 1]
    else:
        empty = build.call(operator.eq, (build.method("sum", (key_weight, -1)), 0))
        empty = build.method("reshape", (empty, (-1, 1, 1, 1)))  # [B, 1, 1, 1]
    if rule == "nan":
        return build.call(torch.where, (empty, float("nan"), out))
    groups = concrete_int(shape_of(site.q)[1]) // concrete_int(shape_of(v)[1])
    if rule == "uniform":
        fallback = build.method("mean", (v, -2), {"keepdim": True})  # [B, Hk, 1, Dv]
    else:  # "argmax": one additive key term
        term = site.mask.key_mask[0]
        m = build.call(operator.mul, (build.method("to", (term.node, torch.float32)), float(term.factor)))
        m = build.method("flatten", (m, 0, -2))  # [B or 1, S]
        top = build.method("amax", (m, -1), {"keepdim": True})
        chosen = build.method("to", (build.call(operator.eq, (m, top)), tensor_meta(v).dtype))
        summed = build.call(torch.einsum, ("bs,bhsd->bhd", chosen, v))
        count = build.method("sum", (chosen, -1))
        fallback = build.call(operator.truediv, (summed, build.method("reshape", (count, (-1, 1, 1)))))
        fallback = build.method("unsqueeze", (fallback, -2))  # [B, Hk, 1, Dv]
        no_key = build.method("reshape", (build.call(operator.eq, (top, float("-inf"))), (-1, 1, 1, 1)))
        fallback = build.call(torch.where, (no_key, float("nan"), fallback))
    if groups > 1:
        fallback = build.method("repeat_interleave", (fallback, groups, 1))
    fallback = build.method("to", (fallback, tensor_meta(out).dtype))
    return build.call(torch.where, (empty, fallback, out))


def key_weight_value(site: AttentionSite, values: dict, q: torch.Tensor) -> torch.Tensor | None:
    """The per-key weight [B, S] that `_key_weight` builds in the graph, computed from the values of the key
    mask terms (`values`: node -> tensor, from a run of the graph) for calibration."""
    weight = None
    if site.mask.static_keys is not None and not bool(site.mask.static_keys.all()):
        weight = site.mask.static_keys.reshape(1, -1).to(device=q.device, dtype=torch.float32)
    for term in site.mask.key_mask:
        leaf = values.get(term.node)
        if leaf is None:
            return None
        w = term_key_weight(leaf, term.kind, float(term.factor))
        weight = w if weight is None else weight * w
    return None if weight is None else weight * torch.ones(q.shape[0], 1, device=q.device)


def alibi_value(site: AttentionSite, q: torch.Tensor) -> torch.Tensor | None:
    slopes = _alibi_per_query_head(site) if site.mask.alibi_slopes is not None else None
    return None if slopes is None else torch.tensor(slopes, dtype=torch.float32, device=q.device)


def switch_name(site_id: int) -> str:
    return f"_almostlinear_switch_{site_id}"


MIN_LEN_PREFIX = "_almostlinear_min_seq_len_"


def min_len_name(site_id: int) -> str:
    return f"{MIN_LEN_PREFIX}{site_id}"


def _buffer(gm: fx.GraphModule, name: str, value: torch.Tensor, build: _Builder, fake_mode) -> fx.Node:
    """A get_attr node for a new buffer of the graph module (with its fake value)."""
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(build.anchor):
        node = gm.graph.get_attr(name)
    fake = fake_mode.from_tensor(getattr(gm, name)) if fake_mode is not None else getattr(gm, name)
    node.meta["example_value"] = node.meta["val"] = fake
    return node


def _switch(gm, site, build: _Builder, fake_mode, options: Options, k: fx.Node) -> fx.Node | None:
    """The 0-d int8 mode of the switchable op (1: polynomial, 0: exact), or None for the plain op.

    recheck_every > 0: a buffer the re-checks flip. Dynamic key length: the length is compared in the graph
    with a 0-d int64 buffer holding min_seq_len (planning sets it to 0 while it measures, so the
    approximation is measured even on an example shorter than the crossover), so one graph serves every
    length without a guard on it."""
    device = tensor_meta(site.q).device
    switch = None
    if options.recheck_every:
        switch = _buffer(gm, switch_name(site.id), torch.ones((), dtype=torch.int8, device=device), build, fake_mode)
    if is_dynamic_length(site):
        threshold = min_seq_len_for(site, options)
        minimum = _buffer(gm, min_len_name(site.id), torch.tensor(threshold, dtype=torch.int64, device=device),
                          build, fake_mode)
        length = build.method("size", (k, -2))
        long_enough = build.call(operator.ge, (build.call(torch.full, ((), length), {"dtype": torch.int64,
                                                                                     "device": device}), minimum))
        gate = build.method("to", (long_enough, torch.int8))
        switch = gate if switch is None else build.call(operator.mul, (switch, gate))
    return switch


def rewrite_polynomial(gm: fx.GraphModule, site: AttentionSite, fake_mode, options: Options, decision) -> tuple:
    """Replace the site with the polynomial op. Returns (rank, description) for the report."""
    build = _Builder(gm, site.output, site.anchor, fake_mode)
    degree = decision.degree or 2
    coefficients = list(decision.coefficients or taylor_coefficients(degree))
    if site.form == "sdpa":
        scale = site.scale
        if not is_number(scale):
            raise RewriteError("SDPA scale is not a constant")
        q = site.q
    else:
        q, scale = _scaled_query(site, build)
    k, v = site.op_kv
    mask = site.mask
    alibi = None
    if mask.alibi_slopes is not None:
        device = tensor_meta(site.q).device
        alibi = build.call(torch.tensor, (_alibi_per_query_head(site),), {"dtype": torch.float32, "device": device})
    key_weight = _key_weight(gm, site, q, build, fake_mode)
    switch = _switch(gm, site, build, fake_mode, options, k)
    if switch is not None:
        from ..kernels.switchable import SWITCHABLE_OP

        op_node = build.call(SWITCHABLE_OP, (q, k, v, key_weight, alibi, switch, float(scale), coefficients,
                                             bool(mask.causal), int(mask.window)))
        out = build.call(operator.getitem, (op_node, 0))
    else:
        args = (q, k, v, key_weight, alibi, float(scale), coefficients, bool(mask.causal), int(mask.window))
        op_node = build.call(POLY_OP, args)
        out = build.call(operator.getitem, (op_node, 0))
    if mask.empty_rows_possible and key_weight is not None:
        out = _eager_empty_rows(site, out, key_weight, v, build)
    site.op_node = op_node  # type: ignore[attr-defined]
    replace_output(gm, site, out, build)
    d = shape_of(site.q)[-1]
    rank = feature_rank(concrete_int(d) or 0, degree)
    kind = "fitted" if decision.coefficients else "Taylor"
    return rank, f"polynomial degree {degree} ({kind}), rank {rank}, mask {mask.kind}"
