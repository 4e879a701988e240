"""Near-miss reasons for attention spellings the matcher recognises but keeps as written (`explain_miss`).

Each rule is a (pattern, reason) pair, tried on a softmax whose match failed; the first that fits replaces the
generic reason of the failed step, so the report says what the code is and why no fused op computes it.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .graph_utils import concrete_int, is_call, ndim_of, normalize_dim, shape_of
from .match_rules import is_cast

_CAT = (torch.cat, torch.concat, torch.concatenate)


def _score_input(softmax: fx.Node) -> fx.Node | None:
    """The softmax's input before a row-max subtraction and casts (`x - x.max(-1, keepdim=True).values`)."""
    x = softmax.args[0]
    for _ in range(4):
        if is_cast(x) or (is_call(x, operator.sub) and isinstance(x.args[0], fx.Node)):
            x = x.args[0]
        else:
            break
    return x if isinstance(x, fx.Node) else None


def _sinks(softmax: fx.Node) -> str | None:
    # gpt-oss (HF eager_attention_forward with `s_aux`), StreamingLLM-style learned sinks: the scores get one
    # more logit column per head, softmax runs over S + 1 and the column is sliced off before @ v
    x = _score_input(softmax)
    if x is None or not is_call(x, *_CAT):
        return None
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if normalize_dim(dim, ndim_of(x)) != (ndim_of(x) or 0) - 1:
        return None
    return ("attention sinks: the softmax runs over the scores and an extra logit column concatenated along the "
            "keys (a learned per-head sink), sliced off before @ v; SDPA and the polynomial op have no extra "
            "logit (exact would need one more zero-valued key whose mask is the sink): kept as written")


def _unfolded(node: fx.Node, window: int, depth: int) -> bool:
    """Whether `node` is (a view of) `x.unfold(dim, window, step)`: keys or values gathered per query."""
    if depth < 0 or not isinstance(node, fx.Node):
        return False
    if is_call(node, "unfold", torch.Tensor.unfold) and node.args[2:3] == (window,):
        return True
    return any(_unfolded(x, window, depth - 1) for x in node.all_input_nodes)


def _banded(softmax: fx.Node) -> str | None:
    # local attention in a banded layout (Longformer-style chunks, lucidrains local-attention, LongT5 blocks):
    # keys padded and unfolded into [..., L, 2w + 1, D] windows, one band per query, softmax over the band
    shape = shape_of(softmax)
    window = concrete_int(shape[-1]) if shape else None
    users = [u for u in softmax.users]
    products = [softmax.args[0]] + [x for u in users for x in u.all_input_nodes if x is not softmax]
    if window is None or not any(_unfolded(x, window, 6) for x in products):
        return None
    return (f"local attention in a banded layout: keys/values are unfolded into windows of {window} per query "
            f"(`unfold`), so the softmax runs over each query's band, not over the key sequence; SDPA and the op "
            f"take [..., S, D] keys with a window mask, which would mean gathering the band back: kept as written")


RULES: tuple[Callable[[fx.Node], str | None], ...] = (_sinks, _banded)


def explain_miss(softmax: fx.Node) -> str | None:
    """The reason a known non-fusable spelling stays as written, or None."""
    for rule in RULES:
        reason = rule(softmax)
        if reason is not None:
            return reason
    return None
