"""One attention layer with a mean-squared loss, and batches whose attention is sharper in some rows than in
others: the model of the budget-on-later-batches checks (tests/rewriter/test_holdout.py,
benchmarks/next_batches.py)."""
from __future__ import annotations

from typing import Iterator

import torch


class AttentionLayer(torch.nn.Module):
    """x [B, T, d] -> q, k, v projections, SDPA over `heads` heads, output projection; loss: mean((out - y)²)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return ((self.proj(o.transpose(1, 2).reshape(B, T, C)) - y) ** 2).mean()


def heavy_tailed_batches(g: torch.Generator, n: int, sharp: float = 2.0, batch: int = 8, length: int = 64,
                         d: int = 16) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (x, y) batches whose rows' input scale is 0.3 + sharp·u⁴ (u uniform): a few rows are far sharper than
    most, so one batch may hold none of them and the next several."""
    for _ in range(n):
        scale = 0.3 + sharp * torch.rand(batch, 1, 1, generator=g) ** 4
        yield scale * torch.randn(batch, length, d, generator=g), torch.randn(batch, length, d, generator=g)
