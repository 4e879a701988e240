"""Training text the examples, tests and benchmarks share: the Python standard library's own source (ships with
every Python, nothing fetched), read as bytes (vocabulary 256), a held-out split and seeded batches."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["batches", "split", "stdlib_text"]


def stdlib_text(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order: int64 tokens in [0, 256)."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def split(data: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(training text, validation text): the last `held_out` share is never trained on."""
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def batches(data: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    """The same (input, target) batches for every run with the same seed: `steps` batches of `batch` windows of
    `seq_len` tokens, targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        yield x, y
