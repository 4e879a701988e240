"""Find attention sites by structure: softmax(scale * q k^T + mask) [dropout] v, and SDPA calls.

The matcher runs on a normalized graph (see `normalize`). From every softmax it walks *up* through the
operations a score may pass through (scale, masks, dtype casts) to the score matmul (`match_scores`), and
*down* through casts and dropout to the matmul with the values (`match_values`). Each step is a small rule
(`match_rules`); a step that fails records a near-miss with its reason, so every softmax that is not
rewritten is explained in the report.

Three things are seen through on the way:

* layout changes: a `view`/`reshape`/`flatten`/`unflatten` of the scores or the weights that keeps the
  (query, key) axes only splits or merges the leading batch/head dims (BLOOM: scores by `baddbmm` over
  [B*H, L, S], viewed as [B, H, L, S] for the mask, weights viewed back for `bmm`). The site is then put in
  one layout, the finest one on its path ([B, H, L, S]): q, k, v and every mask tensor are split to it (a
  reshape they came from is peeled off instead), and the rewrite merges the output back to the layout the
  graph expects (`AttentionSite.output_layout`; `match_layout`);
* known score transforms the fused ops cannot apply: a soft-cap `tanh(s / c) * c` (Gemma-2, Grok) or a
  `clamp`. The site is recorded with `score_transform` set (its masks are those applied after the transform)
  and the planner keeps it as written;
* dead uses: `normalize` erases introspection copies nothing reads; a use that remains (a graph output: a
  returned or stored copy) is named in the near-miss reason.

Shared key/value heads (GQA repeats, multi-query broadcasts) are found by `match_heads`; the mask of each
site is classified by `masks`.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kinds import MaskKind
from . import masks as mask_analysis
from .graph_utils import (arg, concrete_int, is_call, is_number, ndim_of, normalize_dim, placeholder_kinds, shape_of,
                          single_user, tensor_meta, to_networkx)
from .mask_ops import MaskContext, MaskOp, MaskSpec
from .match_einsum import check_einsum_layout, einsum_layout
from .match_heads import broadcast_kv_heads, grouped_kv, per_head_alibi
from .match_layout import LayoutInserter, unify_layout
from .match_misses import explain_miss
from .match_scores import fold_tensor_scale, match_scores, total_scale
from .match_values import match_values
from .normalize import DROPOUT, SOFTMAX, TRANSPOSE
from .site import AttentionSite, NearMiss, NotAttention

SDPA = F.scaled_dot_product_attention


# ---------------------------------------------------------------------------------------------------
# The two forms
# ---------------------------------------------------------------------------------------------------


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


def _match_eager(softmax: fx.Node, site: AttentionSite, gm: fx.GraphModule, ctx: MaskContext) -> None:
    """softmax(scores, -1) [dropout] @ v: the chain, q, k, v, mask ops, layout, scale and shared kv heads."""
    ndim = ndim_of(softmax.args[0])
    dim = normalize_dim(softmax.args[1], ndim)
    if dim is None or dim != ndim - 1:
        raise NotAttention(f"softmax over dim {softmax.args[1]} (not the last)")
    site.chain.append(softmax)
    match_values(softmax, site)
    match_scores(softmax, site)
    einsum_layout(site, LayoutInserter(gm, ctx, site))
    broadcast_kv_heads(site, gm, ctx)
    unify_layout(site, gm, ctx)
    check_einsum_layout(site)
    _check_shapes(site)
    total_scale(site)
    fold_tensor_scale(site, LayoutInserter(gm, ctx, site))
    grouped_kv(site)
    if site.kv_broadcast is not None:
        site.kv_unrepeated, site.gqa_groups = site.kv_broadcast, concrete_int(shape_of(site.q)[1])


def _eager_mask(site: AttentionSite, ctx: MaskContext) -> MaskSpec:
    """The mask after the score transform; one applied before it that removes keys makes the site dense."""
    mask = mask_analysis.analyze(site.mask_ops, site.scores_shape(), ctx)
    if site.score_transform and any(op.kind != "scale" for op in site.pre_transform_ops):
        before = mask_analysis.analyze(site.pre_transform_ops, site.scores_shape(), ctx)
        if before.kind != MaskKind.NONE:  # (a zero bias is no mask)
            return MaskSpec(kind=MaskKind.DENSE, reason=f"a mask or bias applied before the transform "
                                                         f"({site.score_transform}) does not remove keys")
    return mask


def _sdpa_scale(node: fx.Node, q_shape: tuple | None) -> Any:
    """SDPA's `scale`, or its default 1/sqrt(head dim)."""
    scale = arg(node, 6, "scale")
    if scale is None and q_shape is not None:
        head_dim = q_shape[-1]
        if isinstance(head_dim, torch.SymInt):  # dynamic=True: the head dim is a model constant, so specialise
            head_dim = int(head_dim)  # it (a guard) rather than lose the scale
        scale = 1.0 / float(head_dim) ** 0.5 if isinstance(head_dim, int) else None
    return scale


def _match_sdpa(node: fx.Node, site: AttentionSite) -> None:
    site.q, site.k, site.v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    site.sdpa_mask = arg(node, 3, "attn_mask")
    site.dropout_p = arg(node, 4, "dropout_p", 0.0)
    site.is_causal_flag = bool(arg(node, 5, "is_causal", False))
    site.enable_gqa = bool(arg(node, 7, "enable_gqa", False))
    q_shape, k_shape = shape_of(site.q), shape_of(site.k)
    site.scale = _sdpa_scale(node, q_shape)
    site.constant_scale = float(site.scale) if is_number(site.scale) else 1.0
    if site.enable_gqa and q_shape and k_shape and len(q_shape) >= 3:
        try:
            site.gqa_groups = int(q_shape[-3]) // int(k_shape[-3])
        except (TypeError, ValueError, ZeroDivisionError):
            site.gqa_groups = 1
    elif isinstance(site.k, fx.Node) and isinstance(site.v, fx.Node):
        grouped_kv(site)
    site.output = node


def _sdpa_mask(site: AttentionSite, ctx: MaskContext) -> MaskSpec:
    """The mask of an SDPA call: its attn_mask (bool: kept keys; float: added), with is_causal on top."""
    ops = []
    mask = site.sdpa_mask
    if isinstance(mask, fx.Node):
        meta = tensor_meta(mask)
        if meta is not None and meta.dtype == torch.bool:
            ops.append(MaskOp("keep", mask, tensor=mask, value=float("-inf")))
        else:
            ops.append(MaskOp("add", mask, tensor=mask))
    spec = mask_analysis.analyze(ops, site.scores_shape(), ctx)
    spec.neginf_row = 0.0  # SDPA returns 0 (and a zero gradient) on a row whose every key is -inf / False
    if not site.is_causal_flag:
        return spec
    if spec.kind == MaskKind.NONE:
        return MaskSpec(kind=MaskKind.CAUSAL, causal=True, reason="is_causal=True", empty_rows_possible=False,
                        empty_row_rule="none")
    if spec.kind in (MaskKind.CAUSAL, MaskKind.KEY_PADDING, MaskKind.CAUSAL_KEY_PADDING):
        spec.kind = MaskKind.CAUSAL if spec.kind == MaskKind.CAUSAL else MaskKind.CAUSAL_KEY_PADDING
        spec.causal = True
        return spec
    return MaskSpec(kind=MaskKind.DENSE, reason="is_causal combined with a non-causal mask")


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


def _match(node: fx.Node, form: str, site: AttentionSite, gm: fx.GraphModule, ctx: MaskContext) -> None:
    """Match one softmax or SDPA call and classify its mask (raises NotAttention)."""
    if form == "eager":
        try:
            _match_eager(node, site, gm, ctx)
        except NotAttention as exc:
            raise NotAttention(explain_miss(node) or str(exc)) from exc
        site.mask = _eager_mask(site, ctx)
        per_head_alibi(site)
    else:
        _match_sdpa(node, site)
        site.mask = _sdpa_mask(site, ctx)


def find_sites(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[AttentionSite], list[NearMiss]]:
    """All attention sites of a normalized graph, with their masks classified, and the near-misses.

    A site whose layout changes on its path gets conversion nodes (marked `almostlinear_inserted`); those
    nothing reads after the rewrite are erased by `rewrite.finalize`."""
    ctx = MaskContext(gm, to_networkx(gm), placeholder_kinds(gm, example_inputs), example_inputs)
    sites: list[AttentionSite] = []
    misses: list[NearMiss] = []
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        form = "eager" if is_call(node, SOFTMAX) else "sdpa" if is_call(node, SDPA) else None
        if form is None or node in claimed:
            continue
        site = AttentionSite(id=len(sites), form=form, q=node, k=node, v=node, output=node)
        try:
            _match(node, form, site, gm, ctx)
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


__all__ = ["AttentionSite", "NearMiss", "NotAttention", "SDPA", "find_sites"]
