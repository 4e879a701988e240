"""Open up `F.multi_head_attention_forward` so the matcher can see the attention inside it.

`nn.MultiheadAttention` (and so `nn.TransformerEncoderLayer`/`DecoderLayer`) reaches the backend as one
opaque `torch.nn.functional.multi_head_attention_forward` call followed by `getitem(call, 0)` (the output)
and, when used, `getitem(call, 1)` (the weights). `decompose_mha` rewrites each call with
`need_weights=False` into the torch-level ops the function itself runs on that path:

    in-projection (packed `in_proj_weight`, or `q/k/v_proj_weight`)  ->  [B, H, T, D] views
    -> F.scaled_dot_product_attention(q, k, v, attn_mask=merged, dropout_p, is_causal)
    -> permute back to [T, B, E] -> out-projection

The key padding mask and `attn_mask` are merged exactly as the function merges them (bool masks become
additive -inf, float masks are added), with the key padding part kept as `[B, 1, 1, S]` so it visibly
broadcasts over the query dimension (the matcher proves a per-key mask from that shape). Sizes are never
written into the graph (only unsqueeze/unflatten/permute/flatten with constant head counts), so the result
is valid under `dynamic=True`.

Calls that cannot be rewritten are left as they are, with the reason returned (`need_weights=True`,
`bias_k`/`bias_v`, `add_zero_attn`, `static_k`/`static_v`, non-constant flags, ...).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .builder import NodeBuilder
from .graph_utils import fake_mode_of, tensor_meta

MHA = F.multi_head_attention_forward
SDPA = F.scaled_dot_product_attention
LINEAR = torch._C._nn.linear

NEED_WEIGHTS_REASON = "attention weights are returned (need_weights=True)"

_SIGNATURE = inspect.signature(MHA)


class _Skip(Exception):
    """The call is left untouched; the message is the reason reported."""


def _is_mha(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is MHA


def _bind(node: fx.Node) -> dict[str, Any]:
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise _Skip(f"arguments do not fit multi_head_attention_forward's signature ({exc})") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


def _const_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    raise _Skip(f"{name} is not a constant bool ({value!r})")


def _const_int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Skip(f"{name} is not a constant int ({value!r})")


def _tensor_arg(value: Any, name: str, *, optional: bool = True) -> fx.Node | None:
    if value is None:
        if optional:
            return None
        raise _Skip(f"{name} is None")
    if not isinstance(value, fx.Node) or tensor_meta(value) is None:
        raise _Skip(f"{name} is not a tensor computed in the graph ({type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------------
# The pieces of multi_head_attention_forward (need_weights=False path), op for op
# ---------------------------------------------------------------------------------------------------


def _unpack(b: NodeBuilder, packed: fx.Node, parts: int, embed: int) -> list[fx.Node]:
    """`proj.unflatten(-1, (n, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()` then [i]."""
    x = b.method("unflatten", packed, -1, (parts, embed))
    x = b.method("unsqueeze", x, 0)
    x = b.method("transpose", x, 0, -2)
    x = b.method("squeeze", x, -2)
    x = b.method("contiguous", x)
    return [b.getitem(x, i) for i in range(parts)]


def _split3(b: NodeBuilder, node: fx.Node | None) -> list[fx.Node | None]:
    if node is None:
        return [None, None, None]
    chunks = b.method("chunk", node, 3)
    return [b.getitem(chunks, i) for i in range(3)]


def _in_projection(b: NodeBuilder, a: dict, query: fx.Node, key: fx.Node, value: fx.Node, embed: int) -> list[fx.Node]:
    bias = _tensor_arg(a["in_proj_bias"], "in_proj_bias")
    if _const_bool(a["use_separate_proj_weight"], "use_separate_proj_weight"):
        weights = [
            _tensor_arg(a[name], name, optional=False) for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ]
        biases = _split3(b, bias)
        return [b.call(LINEAR, x, w, bb) for x, w, bb in zip((query, key, value), weights, biases)]
    weight = _tensor_arg(a["in_proj_weight"], "in_proj_weight", optional=False)
    if key is value:
        if query is key:  # self-attention: one packed projection
            return _unpack(b, b.call(LINEAR, query, weight, bias), 3, embed)
        split = b.method("split", weight, [embed, 2 * embed])
        w_q, w_kv = b.getitem(split, 0), b.getitem(split, 1)
        if bias is None:
            b_q = b_kv = None
        else:
            split = b.method("split", bias, [embed, 2 * embed])
            b_q, b_kv = b.getitem(split, 0), b.getitem(split, 1)
        q = b.call(LINEAR, query, w_q, b_q)
        k, v = _unpack(b, b.call(LINEAR, key, w_kv, b_kv), 2, embed)
        return [q, k, v]
    weights = _split3(b, weight)
    biases = _split3(b, bias)
    return [b.call(LINEAR, x, w, bb) for x, w, bb in zip((query, key, value), weights, biases)]


def _canonical(b: NodeBuilder, mask: fx.Node | None, name: str, dtype: torch.dtype) -> fx.Node | None:
    """F._canonical_mask: a bool mask becomes 0 / -inf in the query dtype; a float mask is kept."""
    if mask is None:
        return None
    meta = tensor_meta(mask)
    if meta.dtype == torch.bool:
        zeros = b.call(torch.zeros_like, mask, dtype=dtype)
        return b.method("masked_fill", zeros, mask, float("-inf"))
    if not meta.dtype.is_floating_point:
        raise _Skip(f"{name} has dtype {meta.dtype} (only bool and floating masks are supported)")
    return mask


def _out_of_place_canonical(mask: Any) -> None:
    """`zeros_like(m, dtype=...).masked_fill_(m, -inf)` (F._canonical_mask as Dynamo records it, in the
    module before the call) -> `masked_fill`. The filled tensor is fresh and has no other reader, so the
    value is the same; the mask subgraph is then free of in-place ops and can be evaluated at compile time."""
    if not (isinstance(mask, fx.Node) and mask.op == "call_method" and mask.target == "masked_fill_"):
        return
    base = mask.args[0] if mask.args else None
    if isinstance(base, fx.Node) and base.op == "call_function" and base.target is torch.zeros_like:
        if len(base.users) == 1:
            mask.target = "masked_fill"


def _merged_mask(b: NodeBuilder, a: dict, heads: int, batched: bool, dtype: torch.dtype) -> tuple[fx.Node | None, bool, str]:
    """The SDPA attn_mask and is_causal that multi_head_attention_forward computes (need_weights=False path),
    and a description."""
    kpm = _tensor_arg(a["key_padding_mask"], "key_padding_mask")
    attn_mask = _tensor_arg(a["attn_mask"], "attn_mask")
    is_causal = _const_bool(a["is_causal"], "is_causal")
    if is_causal and attn_mask is None:
        raise _Skip("is_causal=True without attn_mask (multi_head_attention_forward raises)")
    if kpm is not None and not batched:
        kpm = b.method("unsqueeze", kpm, 0)
    kpm = _canonical(b, kpm, "key_padding_mask", dtype)
    parts = []
    if is_causal and kpm is None:
        attn_mask = None  # the is_causal hint goes to SDPA as it is
        parts.append("is_causal hint")
    else:
        attn_mask = _canonical(b, attn_mask, "attn_mask", dtype)
        is_causal = False
    merged = None
    if attn_mask is not None:
        ndim = tensor_meta(attn_mask).dim()
        if ndim == 2:  # [L, S] -> [1, 1, L, S]
            merged = b.method("unsqueeze", b.method("unsqueeze", attn_mask, 0), 0)
        elif ndim == 3:  # [B*H, L, S] -> [B, H, L, S]
            merged = b.method("unflatten", attn_mask, 0, (-1, heads))
        else:
            raise _Skip(f"attn_mask has {ndim} dims (multi_head_attention_forward takes 2 or 3)")
        parts.append(f"attn_mask {ndim}-D {'bool' if a['attn_mask'] is not attn_mask else 'float'}")
    if kpm is not None:  # [B, S] -> [B, 1, 1, S]: broadcasts over heads and queries
        key_part = b.method("unsqueeze", b.method("unsqueeze", kpm, 1), 1)
        merged = key_part if merged is None else b.call(operator.add, merged, key_part)
        kind = "bool" if tensor_meta(a["key_padding_mask"]).dtype == torch.bool else "float"
        parts.append(f"key_padding_mask {kind} as [B, 1, 1, S]")
    return merged, is_causal, ", ".join(parts) or "no mask"


def _supported_call(a: dict) -> None:
    """Raise _Skip with the reason where the call uses what the decomposition does not build."""
    if _const_bool(a["need_weights"], "need_weights"):
        raise _Skip(NEED_WEIGHTS_REASON)
    if a["bias_k"] is not None or a["bias_v"] is not None:
        raise _Skip("bias_k/bias_v are set (an extra learned key/value row is appended)")
    if _const_bool(a["add_zero_attn"], "add_zero_attn"):
        raise _Skip("add_zero_attn=True (a zero key/value row is appended)")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise _Skip("static_k/static_v are given")


def _dropout(a: dict) -> Any:
    if not _const_bool(a["training"], "training"):
        return 0.0
    p = a["dropout_p"]
    if not isinstance(p, (int, float, fx.Node)) or isinstance(p, bool):
        raise _Skip(f"dropout_p is not a number ({p!r})")
    return p


def _result_users(node: fx.Node) -> dict[int, list[fx.Node]]:
    """The getitem users of the (output, weights) result; any other use of the tuple is not supported."""
    getitems: dict[int, list[fx.Node]] = {0: [], 1: []}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1):
            getitems[user.args[1]].append(user)
        else:
            raise _Skip(f"the result tuple is used directly by {user.format_node()[:80]}")
    return getitems


def _build(b: NodeBuilder, a: dict, heads: int, embed: int, dropout_p: Any) -> tuple[fx.Node, bool, str]:
    """The explicit ops: [T, (B,) E] inputs -> in-projection -> SDPA -> out-projection. Returns (output,
    is_causal, mask description)."""
    query = _tensor_arg(a["query"], "query", optional=False)
    key = _tensor_arg(a["key"], "key", optional=False)
    value = _tensor_arg(a["value"], "value", optional=False)
    _tensor_arg(a["out_proj_weight"], "out_proj_weight", optional=False)
    out_bias = _tensor_arg(a["out_proj_bias"], "out_proj_bias")
    qmeta = tensor_meta(query)
    if qmeta.dim() not in (2, 3):
        raise _Skip(f"query has {qmeta.dim()} dims (expected [L, E] or [L, B, E])")
    batched = qmeta.dim() == 3
    if not batched:  # [T, E] -> [T, 1, E], keeping which of q, k, v are the same tensor
        unsqueezed: dict[fx.Node, fx.Node] = {}
        for x in (query, key, value):
            if x not in unsqueezed:
                unsqueezed[x] = b.method("unsqueeze", x, 1)
        query, key, value = unsqueezed[query], unsqueezed[key], unsqueezed[value]
    mask, causal, mask_desc = _merged_mask(b, a, heads, batched, qmeta.dtype)
    q, k, v = _in_projection(b, a, query, key, value, embed)
    # [T, B, E] -> [T, B, H, D] -> [B, H, T, D]  (the same strides as MHA's view/transpose/view)
    q, k, v = (b.method("permute", b.method("unflatten", x, -1, (heads, embed // heads)), 1, 2, 0, 3)
               for x in (q, k, v))
    attn = b.call(SDPA, q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    # [B, H, L, D] -> [L, B, H, D] -> [L, B, E] -> out-projection
    out = b.method("flatten", b.method("permute", attn, 2, 0, 1, 3), 2)
    out = b.call(LINEAR, out, a["out_proj_weight"], out_bias)
    return (out if batched else b.method("squeeze", out, 1)), causal, mask_desc


def _splice(gm: fx.GraphModule, node: fx.Node, getitems: dict[int, list[fx.Node]], out: fx.Node) -> None:
    """Route the call's output to `out`, its weights (None when need_weights=False) to None; erase the call."""
    for user in getitems[0]:
        user.replace_all_uses_with(out)
        gm.graph.erase_node(user)
    for user in getitems[1]:
        for consumer in list(user.users):
            consumer.args = fx.node.map_arg(consumer.args, lambda n: None if n is user else n)
            consumer.kwargs = fx.node.map_arg(consumer.kwargs, lambda n: None if n is user else n)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _decompose(gm: fx.GraphModule, node: fx.Node, fake_mode) -> str:
    a = _bind(node)
    _supported_call(a)
    heads = _const_int(a["num_heads"], "num_heads")
    embed = _const_int(a["embed_dim_to_check"], "embed_dim_to_check")
    if heads <= 0 or embed % heads:
        raise _Skip(f"embed_dim {embed} is not divisible by num_heads {heads}")
    dropout_p = _dropout(a)
    getitems = _result_users(node)
    _out_of_place_canonical(a["key_padding_mask"])
    _out_of_place_canonical(a["attn_mask"])
    b = NodeBuilder(gm, node, fake_mode)
    try:
        out, causal, mask_desc = _build(b, a, heads, embed, dropout_p)
    except _Skip:
        b.rollback()
        raise
    except Exception as exc:  # noqa: BLE001 - a failed fake evaluation leaves the call as it was
        b.rollback()
        raise _Skip(f"could not build the decomposition ({type(exc).__name__}: {exc})") from exc
    _splice(gm, node, getitems, out)
    p = dropout_p if not isinstance(dropout_p, fx.Node) else dropout_p.name
    return (
        f"decomposed into SDPA: heads={heads}, head_dim={embed // heads}, "
        f"{'separate' if a['use_separate_proj_weight'] else 'packed'} in-projection, "
        f"mask: {mask_desc}, is_causal={causal}, dropout_p={p}"
    )


def decompose_mha(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Rewrite every `F.multi_head_attention_forward` call with need_weights=False into explicit ops.

    Returns one (node, text) pair per call, in graph order: for a rewritten call the (now erased) call node
    and a description of what was built (it starts with "decomposed"); for a call left untouched the node
    (still in the graph) and the reason, e.g. NEED_WEIGHTS_REASON.
    """
    fake_mode = fake_mode_of(gm)
    results: list[tuple[fx.Node, str]] = []
    for node in list(gm.graph.nodes):
        if not _is_mha(node):
            continue
        try:
            results.append((node, _decompose(gm, node, fake_mode)))
        except _Skip as exc:
            results.append((node, str(exc)))
    if results:
        gm.graph.lint()
        gm.recompile()
    return results


__all__ = ["decompose_mha", "NEED_WEIGHTS_REASON", "MHA"]
