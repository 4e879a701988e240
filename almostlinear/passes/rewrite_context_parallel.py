"""The rewrite under context parallelism (a sequence split across the ranks of a group, each holding a contiguous
shard): every attention site must see the keys of the whole sequence.

Polynomial sites pass fixed-size states (kernels/context_parallel.py has the math)::

    values, moments = poly_key_state(k, v, key_weight, alibi_slopes, Hq, scale, coefficients)
    ext_values, ext_moments = exchange_states(values, moments, S, rank, world, group, causal, alibi_slopes)
    out, kept, den = poly_state_attention(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal,
                                          ext_values, ext_moments)

Exact sites all-gather K, V (and the key weights) and attend with the rank's global causal offset
(context_parallel_glue.exact_sharded_attention).  A site the rewrite cannot shard raises: left as written it
would attend to this rank's keys only, a silently different model.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from .builder import NodeBuilder
from .context_parallel_glue import exact_sharded_attention, exchange_states, global_argmax_mean, global_key_mean
from .graph_utils import concrete_int, example_value, shape_of, tensor_meta
from .rewrite import RewriteError, replace_output, sdpa_dropout_p
from .rewrite_polynomial import alibi_node, key_weight_node, op_query
from .site import AttentionSite

__all__ = ["ContextGroup", "rewrite_context_parallel_polynomial", "rewrite_context_parallel_exact",
           "shardable_or_why"]


@dataclass(frozen=True)
class ContextGroup:
    """The process group a sequence is split over, as the rewrite needs it (resolved at compile time)."""

    group: Any  # the torch.distributed ProcessGroup
    rank: int
    world: int
    name: str  # the group's name, what the functional collectives take

    @classmethod
    def resolve(cls, group: Any) -> "ContextGroup":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("almostlinear: context_parallel needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) before the model is compiled")
        group = dist.group.WORLD if group is None or group is True else group
        return cls(group, dist.get_rank(group), dist.get_world_size(group), group.group_name)

    def lengths(self, mine: int) -> list[int]:
        """Every rank's value of `mine` (a collective, at compile time: every rank rewrites the same sites in the
        same order)."""
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, int(mine), group=self.group)
        return [int(n) for n in out]


def shardable_or_why(site: AttentionSite) -> str | None:
    """None where the site is self-attention over the sharded sequence, else why it cannot be sharded."""
    q_len, k_len = shape_of(site.q)[-2], shape_of(site.op_kv[0])[-2]
    same = (concrete_int(q_len) == concrete_int(k_len)) if concrete_int(q_len) is not None else str(q_len) == str(k_len)
    if not same:
        return (f"query length {q_len} and key length {k_len} differ (cross-attention or a cache): only "
                f"self-attention over the sharded sequence can be split")
    if site.mask.kind == "dense":
        return f"a dense mask ({site.mask.reason or 'not per-key, causal, window or ALiBi'}) cannot be split by rows"
    if site.score_transform:
        return f"the scores pass through a transform ({site.score_transform})"
    return None


def _site_inputs(site: AttentionSite, build: NodeBuilder):
    q, scale = op_query(site, build)
    k, v = site.op_kv
    return q, scale, k, v, alibi_node(site, build), key_weight_node(site, q, build)


def _bytes(node: fx.Node) -> int:
    return math.prod(int(x) for x in shape_of(node)) * tensor_meta(node).dtype.itemsize


def _polynomial_why(site: AttentionSite, coefficients: Sequence[float]) -> str | None:
    why = shardable_or_why(site)
    if why is None and len(coefficients) != 3:
        why = f"degree {len(coefficients) - 1}: the states' exchange is built for degree 2"
    if why is None and site.mask.window:
        why = f"a mask window ({site.mask.window}): the polynomial states' exchange does not cut bands"
    if why is None and site.mask.alibi_slopes is not None and not site.mask.causal:
        why = "ALiBi without a causal mask: the rescaled states of later ranks could overflow"
    if why is None and site.mask.alibi_slopes is not None and min(site.mask.alibi_slopes) < 0:
        why = "negative ALiBi slopes: the rescaled states of earlier ranks could overflow"
    return why


def _exact_lengths(site: AttentionSite, group: ContextGroup) -> list[int]:
    """Every rank's shard length (a compile-time collective), or RewriteError where exact attention cannot gather."""
    why = shardable_or_why(site)
    length = concrete_int(shape_of(site.op_kv[0])[-2])
    if why is None and length is None:
        why = "a dynamic shard length: the gathered keys' layout is fixed at compile time (compile with dynamic=False)"
    if why is None and site.mask.empty_rows_possible and site.mask.empty_row_rule not in ("neginf", "uniform", "argmax"):
        why = f"rows with no key follow the rule {site.mask.empty_row_rule!r}, not reproduced across ranks"
    if why is not None:
        raise RewriteError(why)
    return group.lengths(length)


class _Part:
    """The site's q, k, v, ALiBi slopes for some heads (all of them, or a per-head decision's share)."""

    def __init__(self, q, k, v, alibi, groups: int):
        self.q, self.k, self.v, self.alibi, self.groups = q, k, v, alibi, groups


def _polynomial_part(site, build, part: _Part, key_weight, scale, coeffs, group) -> tuple[fx.Node, fx.Node, int]:
    """(out, the op node, bytes sent) of the states' exchange and poly_state_attention on `part`."""
    q, k, v, alibi = part.q, part.k, part.v, part.alibi
    heads = concrete_int(shape_of(q)[1])
    state = build.call(torch.ops.almostlinear.poly_key_state.default, k, v, key_weight, alibi, heads, scale, coeffs)
    values, moments = build.getitem(state, 0), build.getitem(state, 1)
    causal = bool(site.mask.causal)
    ext = build.call(exchange_states, values, moments, build.method("size", k, -2), group.rank, group.world,
                     group.name, causal, alibi)
    keep = bool(getattr(example_value(site.output), "requires_grad", False))
    op_node = build.call(torch.ops.almostlinear.poly_state_attention.default, q, k, v, key_weight, alibi, scale,
                         coeffs, causal, build.getitem(ext, 0), build.getitem(ext, 1), keep_states=keep)
    out = build.getitem(op_node, 0)
    if site.mask.empty_rows_possible and key_weight is not None:
        den = build.getitem(op_node, 2)  # [B, Hq, L]: 0 exactly where a row sees no key
        empty = build.method("unsqueeze", build.call(operator.eq, den, 0), -1)
        out = _empty_rows(site, out, empty, v, part.groups, group, build)
    return out, op_node, _bytes(values) + _bytes(moments)


def _exact_part(site, build, part: _Part, key_weight, scale, group, lengths) -> tuple[fx.Node, int]:
    """(out, bytes sent) of exact attention over the gathered keys and values of `part`."""
    k, v = part.k, part.v
    result = build.call(exact_sharded_attention, part.q, k, v, key_weight, part.alibi, scale, bool(site.mask.causal),
                        int(site.mask.window), lengths, group.rank, group.name, sdpa_dropout_p(site))
    out = build.getitem(result, 0)
    if site.mask.empty_rows_possible:
        out = _empty_rows(site, out, build.getitem(result, 1), v, part.groups, group, build)
    per_key = sum(int(shape_of(x)[1]) * int(shape_of(x)[-1]) * tensor_meta(x).dtype.itemsize for x in (k, v))
    batch = int(shape_of(k)[0])
    return out, batch * per_key * max(lengths) + (batch * max(lengths) * 4 if key_weight is not None else 0)


def _select(build, x, dim: int, index: list[int]):
    if x is None:
        return None
    device = tensor_meta(x).device
    return build.method("index_select", x, dim, build.call(torch.tensor, index, dtype=torch.int64, device=device))


def rewrite_context_parallel_polynomial(gm: fx.GraphModule, site: AttentionSite, fake_mode,
                                        coefficients: Sequence[float], group: ContextGroup,
                                        heads: Sequence[int] | None = None) -> tuple[fx.Node, int]:
    """Replace the site with the states' exchange and poly_state_attention; `heads`: the key/value heads that run it
    (None: all), exact attention over the gathered keys and values on the others. Returns (the op node, the bytes
    this rank contributes to the all-gathers per call)."""
    why = _polynomial_why(site, coefficients)
    if why is not None:
        raise RewriteError(why)
    Hq, Hk = concrete_int(shape_of(site.q)[1]), concrete_int(shape_of(site.op_kv[0])[1])
    G = Hq // Hk
    heads = None if heads is None or len(set(heads)) == Hk else sorted(set(heads))
    lengths = _exact_lengths(site, group) if heads is not None else None
    build = NodeBuilder(gm, site.output, fake_mode, source=site.anchor)
    q, scale, k, v, alibi, key_weight = _site_inputs(site, build)
    coeffs = [float(c) for c in coefficients]
    if heads is None:
        out, op_node, sent = _polynomial_part(site, build, _Part(q, k, v, alibi, G), key_weight, scale, coeffs, group)
    else:  # one site, two parts: the approximated key/value heads (with their query heads) and the others
        exact = [h for h in range(Hk) if h not in heads]
        parts = []
        for kv in (heads, exact):
            qh = [h * G + g for h in kv for g in range(G)]
            parts.append(_Part(_select(build, q, 1, qh), _select(build, k, 1, kv), _select(build, v, 1, kv),
                               _select(build, alibi, 0, qh), G))
        out_p, op_node, sent = _polynomial_part(site, build, parts[0], key_weight, scale, coeffs, group)
        out_e, sent_e = _exact_part(site, build, parts[1], key_weight, scale, group, lengths)
        sent += sent_e
        order = [h * G + g for h in heads + exact for g in range(G)]
        inverse = [order.index(h) for h in range(Hq)]
        out = _select(build, build.call(torch.cat, [out_p, out_e], 1), 1, inverse)
    replace_output(gm, site, out, build)
    return op_node, sent


def _empty_rows(site: AttentionSite, out: fx.Node, empty: fx.Node, v: fx.Node, groups: int, group: ContextGroup,
                build: NodeBuilder) -> fx.Node:
    """The matched code's value on rows that see no key in the whole sequence (passes/mask_ops EMPTY_ROW_RULES):
    "neginf" (eager softmax: NaN; SDPA: 0), "uniform" (the mean of every value of the sequence), "argmax" (the
    mean of the values at the keys of the sequence's largest additive key bias). `groups`: query heads per key/value
    head."""
    rule, neginf = site.mask.empty_row_rule, float(site.mask.neginf_row)
    if rule == "neginf":
        return build.call(torch.where, empty, neginf, out)
    if rule == "uniform":
        fallback = build.call(global_key_mean, v, build.method("size", v, -2), group.name)  # [B, Hk, 1, Dv]
    elif rule == "argmax":
        term = site.mask.key_mask[0]
        bias = build.call(operator.mul, build.method("to", term.node, torch.float32), float(term.factor))
        fallback = build.call(global_argmax_mean, v, build.method("flatten", bias, 0, -2), group.name, neginf)
    else:
        raise RewriteError(f"rows with no key follow the rule {rule!r}, not reproduced across ranks")
    if groups > 1:
        fallback = build.method("repeat_interleave", fallback, groups, 1)
    return build.call(torch.where, empty, build.method("to", fallback, tensor_meta(out).dtype), out)


def rewrite_context_parallel_exact(gm: fx.GraphModule, site: AttentionSite, fake_mode, group: ContextGroup) -> int:
    """Replace the site with exact attention over the group's gathered keys and values. Returns the bytes this rank
    contributes to the all-gathers per call."""
    lengths = _exact_lengths(site, group)
    build = NodeBuilder(gm, site.output, fake_mode, source=site.anchor)
    q, scale, k, v, alibi, key_weight = _site_inputs(site, build)
    groups = concrete_int(shape_of(site.q)[1]) // concrete_int(shape_of(k)[1])
    out, sent = _exact_part(site, build, _Part(q, k, v, alibi, groups), key_weight, scale, group, lengths)
    replace_output(gm, site, out, build)
    return sent
