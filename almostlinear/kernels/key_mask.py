"""The op's mask semantics: which keys a query sees.

Causal: j <= i (top-left aligned, like SDPA's is_causal).  Window w > 0: with causal i - w < j <= i,
without causal |i - j| < w.  Used by the CPU kernels (one block of keys at a time), the exact fallback
and the switchable op's exact backward.  The naive reference (naive.py) spells the rule out on its own:
the test oracle stays independent of the code it checks.
"""
from __future__ import annotations

import torch

__all__ = ["allowed_keys", "allowed_key_block"]


def allowed_key_block(query_index: torch.Tensor, key_index: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """[m, n] bool: which of the keys at `key_index` ([1, n]) the queries at `query_index` ([m, 1]) see."""
    allowed = torch.ones(query_index.shape[0], key_index.shape[-1], dtype=torch.bool, device=query_index.device)
    if causal:
        allowed &= key_index <= query_index
        if window:
            allowed &= key_index > query_index - window
    elif window:
        allowed &= (query_index - key_index).abs() < window
    return allowed


def allowed_keys(query_index: torch.Tensor, S: int, causal: bool, window: int) -> torch.Tensor:
    """[m, S] bool: which of the keys 0..S-1 the queries at `query_index` ([m, 1]) see."""
    return allowed_key_block(query_index, torch.arange(S, device=query_index.device).reshape(1, -1), causal, window)
