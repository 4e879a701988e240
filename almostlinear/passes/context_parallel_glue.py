"""Traceable helpers the context-parallel rewrite calls in the rewritten graph (passes/rewrite_context_parallel.py):
the states' exchange over the group and, for exact sites, the gathered keys and values.

Collectives are torch.distributed._functional_collectives (all_gather_single: autograd-aware, its backward a
reduce-scatter), so the graph runs eagerly and traces through AOTAutograd and Inductor with no graph break.
The math of the states is kernels/context_parallel.py's docstring.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["external_state", "exchange_states", "gather_lengths", "gather_sequence", "global_key_mean",
           "exact_sharded_attention", "global_argmax_mean"]


def gather_lengths(length, group_name: str, device) -> torch.Tensor:
    """int64 [W]: every rank's shard length (this rank's `length` is an int or SymInt)."""
    from torch.distributed._functional_collectives import all_gather_single

    mine = torch.full((1,), length, dtype=torch.int64, device=device)
    return all_gather_single(mine, 0, group_name)


def external_state(values_all: torch.Tensor, moments_all: torch.Tensor, lengths: torch.Tensor, rank: int,
                   causal: bool, alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The external state rank `rank` reads: the sum of the gathered states [W, B, Hk, r, Gs*Dv] / [W, B, Hk, Gs, M]
    that it sees (causal: ranks before it; otherwise all), each rescaled from its own reference key
    (s_r' + L_r' - 1) to this rank's first position s_r by exp(m (s_r' + L_r' - 1 - s_r)) (ALiBi)."""
    W, Gs = values_all.shape[0], moments_all.shape[3]
    ranks = torch.arange(W, device=values_all.device)
    visible = (ranks < rank) if causal else torch.ones(W, dtype=torch.bool, device=values_all.device)
    visible = visible.to(values_all.dtype)
    if alibi_slopes is None:
        vw = visible.view(W, 1, 1, 1, 1)
        return (values_all * vw).sum(0), (moments_all * vw).sum(0)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = (starts + lengths - 1 - starts[rank]).to(values_all.dtype)  # [W]
    Hk = values_all.shape[2]
    m = alibi_slopes.to(values_all.dtype).view(1, Hk, -1)  # [1, Hk, G]
    m = m if Gs > 1 else m[..., :1]
    log_w = m * offset.view(W, 1, 1)  # [W, Hk, Gs]
    weight = torch.exp(torch.where(visible.view(W, 1, 1) > 0, log_w, torch.full_like(log_w, float("-inf"))))
    B, r, cols = values_all.shape[1], values_all.shape[3], values_all.shape[4]
    values = values_all.view(W, B, Hk, r, Gs, cols // Gs) * weight.view(W, 1, Hk, 1, Gs, 1)
    moments = moments_all * weight.view(W, 1, Hk, Gs, 1)
    return values.sum(0).reshape(B, Hk, r, cols), moments.sum(0)


def exchange_states(values: torch.Tensor, moments: torch.Tensor, length, rank: int, world: int, group_name: str,
                    causal: bool, alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather this rank's state (one fp32 message: values and moments packed) and return the external state
    it reads (:func:`external_state`)."""
    from torch.distributed._functional_collectives import all_gather_single

    packed = torch.cat([values.reshape(1, -1), moments.reshape(1, -1)], 1)
    gathered = all_gather_single(packed, 0, group_name)  # [W, n]
    nv = values.numel()
    values_all = gathered[:, :nv].reshape(world, *values.shape)
    moments_all = gathered[:, nv:].reshape(world, *moments.shape)
    lengths = gather_lengths(length, group_name, values.device) if alibi_slopes is not None else None
    return external_state(values_all, moments_all, lengths, rank, causal, alibi_slopes)


def gather_sequence(x: torch.Tensor, dim: int, lengths: Sequence[int], group_name: str) -> torch.Tensor:
    """Every rank's shard of `x` along `dim`, concatenated in rank order (shards of the static `lengths`: each is
    padded to the longest for the all-gather and cut back)."""
    from torch.distributed._functional_collectives import all_gather_single

    longest = max(lengths)
    pad = longest - x.shape[dim]
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = torch.nn.functional.pad(x, widths)
    gathered = all_gather_single(x.unsqueeze(0).contiguous(), 0, group_name)  # [W, ...]
    parts = [gathered[r].narrow(dim, 0, n) for r, n in enumerate(lengths) if n]
    return torch.cat(parts, dim)


def global_key_mean(v: torch.Tensor, length, group_name: str) -> torch.Tensor:
    """[B, Hk, 1, Dv]: the mean of the values of the whole sequence (every rank's keys)."""
    from torch.distributed._functional_collectives import all_gather_single

    sums = v.to(torch.float32).sum(-2).reshape(1, -1)
    count = torch.full((1, 1), length, dtype=torch.float32, device=v.device)
    gathered = all_gather_single(torch.cat([sums, count], 1), 0, group_name).sum(0)
    return (gathered[:-1] / gathered[-1]).reshape(v.shape[0], v.shape[1], 1, v.shape[-1])


def global_argmax_mean(v: torch.Tensor, bias: torch.Tensor, group_name: str, neginf_row: float) -> torch.Tensor:
    """[B, Hk, 1, Dv]: the mean of the values at the keys of the whole sequence whose additive key bias [B, L] is
    the sequence's largest (what softmax gives a row whose every score is that bias plus -inf elsewhere);
    `neginf_row` where the largest bias is -inf."""
    from torch.distributed._functional_collectives import all_gather_single

    B, Hk, _, Dv = v.shape
    bias = bias.to(torch.float32).expand(B, bias.shape[-1])
    local_top = bias.amax(-1, keepdim=True) if bias.shape[-1] else torch.full((B, 1), float("-inf"), device=v.device)
    top = all_gather_single(local_top.reshape(1, B), 0, group_name).amax(0).reshape(B, 1)
    chosen = (bias == top).to(torch.float32)  # [B, L]
    sums = torch.einsum("bs,bhsd->bhd", chosen, v.to(torch.float32)).reshape(B, -1)
    packed = torch.cat([sums, chosen.sum(-1, keepdim=True)], 1).unsqueeze(0)
    total = all_gather_single(packed, 0, group_name).sum(0)  # [B, Hk * Dv + 1]
    mean = (total[:, :-1] / total[:, -1:]).reshape(B, Hk, 1, Dv)
    return torch.where(torch.isneginf(top).reshape(B, 1, 1, 1), neginf_row, mean)


def _unmasked(q, k_all, v_all, scale, causal, offset: int, dropout_p, gqa):
    """Exact attention with no mask tensor, so that SDPA keeps its fused (flash) kernels and O(n) memory.  Causal
    with the rank's offset: q is front-padded with `offset` zero rows so that SDPA's top-left causal mask puts
    query i at global position offset + i (the padded rows' outputs are dropped; they cost compute, not memory)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not causal:
        return sdpa(q, k_all, v_all, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    L = q.shape[2]
    padded = torch.nn.functional.pad(q, (0, 0, offset, 0))
    keys = offset + L
    out = sdpa(padded, k_all[:, :, :keys], v_all[:, :, :keys], dropout_p=dropout_p, is_causal=True, scale=scale,
               enable_gqa=gqa)
    return out[:, :, offset:]


def exact_sharded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
                            alibi_slopes: Optional[torch.Tensor], scale: float, causal: bool, window: int,
                            lengths: Sequence[int], rank: int, group_name: str,
                            dropout_p) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, empty): exact softmax attention of this rank's queries q [B, Hq, L, D] over the keys and values of
    every rank (gathered: [B, Hk, N, .]), with the global positions of the queries (offset s_r = the lengths
    before it): causal j <= i, window (causal i - w < j <= i, else |i - j| < w), ALiBi m (j - i), key weights
    [B, L] (0 removes a key, else log w is added); `empty` [B|1, 1, L, 1] marks the rows with no key (their out is
    0: the caller gives them the matched code's value)."""
    k_all, v_all = gather_sequence(k, 2, lengths, group_name), gather_sequence(v, 2, lengths, group_name)
    B, Hq, L, _ = q.shape
    N = k_all.shape[2]
    gqa = Hq != k_all.shape[1]
    if key_weight is None and alibi_slopes is None and not window:  # no mask tensor: SDPA's fused kernels
        return _unmasked(q, k_all, v_all, scale, causal, sum(lengths[:rank]), dropout_p, gqa), torch.zeros(
            1, 1, L, 1, dtype=torch.bool, device=q.device)
    i = sum(lengths[:rank]) + torch.arange(L, device=q.device).unsqueeze(-1)
    j = torch.arange(N, device=q.device).unsqueeze(0)
    allowed = torch.ones(L, N, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (j <= i)
    if window:
        allowed = allowed & ((j > i - window) if causal else ((i - j).abs() < window))
    bias = torch.zeros(1, 1, L, N, dtype=torch.float32, device=q.device)
    if alibi_slopes is not None:
        bias = bias + alibi_slopes.to(torch.float32).reshape(1, Hq, 1, 1) * (j - i).to(torch.float32)
    valid = allowed.reshape(1, 1, L, N)
    if key_weight is not None:
        kw = gather_sequence(key_weight, 1, lengths, group_name).to(torch.float32).reshape(B, 1, 1, N)
        valid = valid & (kw > 0)
        bias = bias + torch.log(kw.clamp_min(1e-38))
    any_valid = valid.any(-1, keepdim=True)
    bias = torch.where(valid, bias, float("-inf"))
    bias = torch.where(any_valid, bias, 0.0)  # no NaN inside SDPA; such rows are zeroed
    out = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias.to(q.dtype),
                                                           dropout_p=dropout_p, scale=scale,
                                                           enable_gqa=Hq != k_all.shape[1])
    return out * any_valid.to(out.dtype), ~any_valid
