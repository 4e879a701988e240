"""Traceable helpers the context-parallel rewrite calls in the rewritten graph (passes/rewrite_context_parallel.py):
the states' exchange over the group and, for exact sites, the gathered keys and values.

Collectives are torch.distributed._functional_collectives (all_gather_single: autograd-aware, its backward a
reduce-scatter), so the graph runs eagerly and traces through AOTAutograd and Inductor with no graph break.
The math of the states is kernels/context_parallel.py's docstring.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["external_state", "exchange_states", "gather_lengths", "gather_sequence", "global_offset"]


def gather_lengths(length, group_name: str, device) -> torch.Tensor:
    """int64 [W]: every rank's shard length (this rank's `length` is an int or SymInt)."""
    from torch.distributed._functional_collectives import all_gather_single

    mine = torch.full((1,), length, dtype=torch.int64, device=device)
    return all_gather_single(mine, 0, group_name)


def global_offset(lengths: torch.Tensor, rank: int) -> torch.Tensor:
    """int64 0-d: this rank's first global position."""
    return lengths[:rank].sum()


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
