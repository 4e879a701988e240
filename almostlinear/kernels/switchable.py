"""A polynomial site that can switch to exact attention at run time, without a recompile.

Used when `recheck_every` > 0. The rewritten graph calls

    out, mode = almostlinear::switchable_attention(q, k, v, key_weight, alibi_slopes, switch, scale,
                                                   coefficients, causal, window, exact_window=0)

where `switch` is an int8 tensor of the graph module: 0-d (the whole site: 1 polynomial, 0 exact) or [Hk], one
mode per key/value head (per-head decisions: the op runs on the heads whose mode is 1, exact attention on the
others; GQA: a key/value head and all its query heads); with ``exact_window`` > 0 the polynomial branch keeps
exact softmax on each query's nearest keys (kernels/exact_window.py). The op returns the mode it used, and the backward
receives that mode, so forward and backward of one call always agree even if the switch flips in between.
The exact branch is SDPA with the op's mask semantics.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .cpu import autocast_disabled
from .key_mask import allowed_keys
from .exact_window import window_backward_recomputed
from .op import exact_attention, register_autocast


def _exact(q, k, v, key_weight, alibi_slopes, scale, causal, window):
    return exact_attention(q, k, v, scale=scale, causal=causal, key_weight=key_weight, alibi_slopes=alibi_slopes,
                           window=window)


def _flash_cpu(q, k, key_weight, alibi_slopes, causal: bool, window: int) -> bool:
    """Plain or causal attention on the CPU: aten's fused flash kernel, whose logsumexp the backward reuses."""
    return q.device.type == "cpu" and key_weight is None and alibi_slopes is None and not window and (
        not causal or q.shape[2] == k.shape[2])


def _repeat_kv(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)) if groups > 1 else (k, v)


def heads_in_mode(mode: torch.Tensor, q: torch.Tensor, k: torch.Tensor, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key/value heads) whose mode is `on` (GQA: each key/value head's G query heads)."""
    kv = (mode != 0).nonzero().flatten() if on else (mode == 0).nonzero().flatten()
    groups = q.shape[1] // k.shape[1]
    qh = (kv.reshape(-1, 1) * groups + torch.arange(groups, device=kv.device)).flatten()
    return qh.to(q.device), kv.to(k.device)


def mixed_modes(mode: torch.Tensor) -> bool:
    return mode.dim() > 0 and bool((mode != 0).any()) and bool((mode == 0).any())


def _forward_uniform(on: bool, q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window,
                     exact_window=0):
    """(out, logsumexp) with every head in one mode (logsumexp: of the CPU flash kernel, else zeros)."""
    lse = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    if on and exact_window:
        out = torch.ops.almostlinear.poly_window_attention(q, k, v, key_weight, alibi_slopes, scale,
                                                           list(coefficients), causal, window, exact_window)[0]
    elif on:
        out = torch.ops.almostlinear.poly_attention(q, k, v, key_weight, alibi_slopes, scale, list(coefficients),
                                                    causal, window)[0]
    elif _flash_cpu(q, k, key_weight, alibi_slopes, causal, window):
        kk, vv = _repeat_kv(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kk, vv, 0.0, causal, scale=scale)
        lse = lse.float()
    else:
        out = _exact(q, k, v, key_weight, alibi_slopes, scale, causal, window)
    return out, lse


def _forward_mixed(mode, q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window, exact_window):
    """Per-head modes: each group of heads computed in its mode, the results placed back by head."""
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    lse = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    for on in (True, False):
        qh, kh = heads_in_mode(mode, q, k, on)
        alibi = alibi_slopes.index_select(0, qh) if alibi_slopes is not None else None
        part, part_lse = _forward_uniform(on, q.index_select(1, qh), k.index_select(1, kh), v.index_select(1, kh),
                                          key_weight, alibi, scale, coefficients, causal, window, exact_window)
        out.index_copy_(1, qh, part.to(out.dtype))
        lse.index_copy_(1, qh, part_lse)
    return out, lse


@torch.library.custom_op("almostlinear::switchable_attention", mutates_args=())
def switchable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
                         alibi_slopes: Optional[torch.Tensor], switch: torch.Tensor, scale: float,
                         coefficients: Sequence[float], causal: bool, window: int,
                         exact_window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mode, logsumexp): the logsumexp [B, Hq, L] of the exact branch on the CPU flash kernel, so that
    its backward does not recompute the forward (a dynamic-length site runs this branch below min_seq_len;
    recomputing made it ~30% slower than fused SDPA); zeros otherwise."""
    mode = switch.detach().clone()
    with autocast_disabled(q):  # both branches compute in the dtypes that arrive (see register_autocast below)
        if mixed_modes(mode):
            out, lse = _forward_mixed(mode, q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window,
                                      exact_window)
        else:
            out, lse = _forward_uniform(bool((mode != 0).any()), q, k, v, key_weight, alibi_slopes, scale,
                                        coefficients, causal, window, exact_window)
    return out.contiguous(), mode, lse.contiguous()


@switchable_attention.register_fake
def _(q, k, v, key_weight, alibi_slopes, switch, scale, coefficients, causal, window, exact_window=0):
    return (q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), torch.empty_like(switch),
            q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32))


def _sum_over_groups(dk, dv, k):
    """Gradients of K/V repeated per query head [B, Hq, S, .] -> [B, Hk, S, .] (GQA: summed over each key head's
    query heads)."""
    B, Hk, S, _ = k.shape
    if dk.shape[1] == Hk:
        return dk, dv
    return dk.reshape(B, Hk, -1, S, dk.shape[-1]).sum(2), dv.reshape(B, Hk, -1, S, dv.shape[-1]).sum(2)


def _flash_cpu_backward(grad, q, k, v, scale: float, causal: bool, out=None, lse=None):
    """Plain or causal attention on CPU: the fused flash kernel's backward, given the forward's out and logsumexp
    (None: recomputed with the flash kernel)."""
    kk, vv = _repeat_kv(q, k, v)
    if lse is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kk, vv, 0.0, causal, scale=scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad.to(q.dtype), q, kk, vv, out, lse, 0.0, causal, scale=scale)
    return (dq, *_sum_over_groups(dk, dv, k))


def exact_attention_backward(grad, q, k, v, key_weight, alibi_slopes, scale: float, causal: bool, window: int,
                             block: int = 256):
    """dq, dk, dv of exact softmax attention with the op's mask semantics, in query blocks (no n x n).

    Plain and causal attention on CPU use the fused flash kernel's backward instead.

    q [B, Hq, L, D], k/v [B, Hk, S, D]; fp32 accumulation; fully masked rows contribute nothing.
    """
    if _flash_cpu(q, k, key_weight, alibi_slopes, causal, window):
        return _flash_cpu_backward(grad, q, k, v, scale, causal)
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    qf, gf = q.float(), grad.float()
    kf, vf = _repeat_kv(q, k.float(), v.float())
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    j = torch.arange(S, device=q.device).reshape(1, -1)
    log_weight = None
    if key_weight is not None:
        kw = key_weight.float().reshape(B, 1, 1, S)
        log_weight = torch.where(kw > 0, torch.log(kw.clamp_min(1e-38)), torch.full_like(kw, float("-inf")))
    for start in range(0, L, block):
        stop = min(L, start + block)
        i = torch.arange(start, stop, device=q.device).reshape(-1, 1)
        logits = scale * (qf[:, :, start:stop] @ kf.transpose(-2, -1))
        allowed = allowed_keys(i, S, causal, window)
        if alibi_slopes is not None:
            logits = logits + alibi_slopes.float().reshape(1, Hq, 1, 1) * (j - i).float()
        if log_weight is not None:
            logits = logits + log_weight
        logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        g = gf[:, :, start:stop]
        out = p @ vf
        dv += p.transpose(-2, -1) @ g
        dp = g @ vf.transpose(-2, -1)
        ds = p * (dp - (g * out).sum(-1, keepdim=True))
        dq[:, :, start:stop] = scale * (ds @ kf)
        dk += scale * (ds.transpose(-2, -1) @ qf[:, :, start:stop])
    dk, dv = _sum_over_groups(dk, dv, k)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_uniform(on: bool, grad, q, k, v, out, key_weight, alibi_slopes, lse, scale, coefficients, causal,
                      window, exact_window=0):
    if on and exact_window:  # the window's row shifts and denominators come from a fresh forward
        return window_backward_recomputed(grad, q, k, v, key_weight, alibi_slopes, scale, coefficients, causal,
                                          window, exact_window)
    if on:  # the forward's state is not kept across the switch (its shape depends on the mode): recomputed
        return torch.ops.almostlinear.poly_attention_backward(grad, q, k, v, out, q.new_empty(0), key_weight,
                                                              alibi_slopes, scale, list(coefficients), causal, window)
    if _flash_cpu(q, k, key_weight, alibi_slopes, causal, window):  # the forward's logsumexp: no recompute
        return _flash_cpu_backward(grad, q, k, v, scale, causal, out, lse.to(torch.float32))
    return exact_attention_backward(grad, q, k, v, key_weight, alibi_slopes, scale, causal, window)


def _backward_mixed(mode, grad, q, k, v, out, key_weight, alibi_slopes, lse, scale, coefficients, causal, window,
                    exact_window):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for on in (True, False):
        qh, kh = heads_in_mode(mode, q, k, on)
        alibi = alibi_slopes.index_select(0, qh) if alibi_slopes is not None else None
        parts = _backward_uniform(on, grad.index_select(1, qh).contiguous(), q.index_select(1, qh),
                                  k.index_select(1, kh), v.index_select(1, kh), out.index_select(1, qh).contiguous(),
                                  key_weight, alibi, lse.index_select(1, qh).contiguous(), scale, coefficients,
                                  causal, window, exact_window)
        for full, index, part in ((dq, qh, parts[0]), (dk, kh, parts[1]), (dv, kh, parts[2])):
            full.index_copy_(1, index, part.to(full.dtype))
    return dq, dk, dv


@torch.library.custom_op("almostlinear::switchable_attention_backward", mutates_args=())
def switchable_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, key_weight: Optional[torch.Tensor],
                                  alibi_slopes: Optional[torch.Tensor], mode: torch.Tensor, lse: torch.Tensor,
                                  scale: float, coefficients: Sequence[float], causal: bool, window: int,
                                  exact_window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    args = (grad, q, k, v, out, key_weight, alibi_slopes, lse, scale, coefficients, causal, window, exact_window)
    with autocast_disabled(q):  # a backward run inside an autocast region keeps the forward's dtypes
        if mixed_modes(mode):
            dq, dk, dv = _backward_mixed(mode, *args)
        else:
            dq, dk, dv = _backward_uniform(bool((mode != 0).any()), *args)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@switchable_attention_backward.register_fake
def _(grad, q, k, v, out, key_weight, alibi_slopes, mode, lse, scale, coefficients, causal, window, exact_window=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, alibi_slopes, switch, scale, coefficients, causal, window, exact_window = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(q, k, v, output[0], key_weight, alibi_slopes, output[1], output[2])
    ctx.args = (scale, list(coefficients), causal, window, exact_window)


def _backward(ctx, grad, _grad_mode, _grad_lse):
    q, k, v, out, key_weight, alibi_slopes, mode, lse = ctx.saved_tensors
    dq, dk, dv = switchable_attention_backward(grad, q, k, v, out, key_weight, alibi_slopes, mode, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


switchable_attention.register_autograd(_backward, setup_context=_setup_context)
# under autocast: q, k, v cast to the autocast dtype and the op run with autocast off, like poly_attention
# (the output dtype is then the same in either mode, and what eager attention gives)
register_autocast(torch.ops.almostlinear.switchable_attention.default)

SWITCHABLE_OP = torch.ops.almostlinear.switchable_attention.default
