"""Context parallelism for users: compile a model for a sequence split over a process group, and cut or rejoin
the tensors along the sequence.

    model = almostlinear.context_parallel(model, group=None, method="polynomial")     # torch.compile'd
    ids = almostlinear.shard_sequence(full_ids, dim=1)          # this rank's contiguous slice
    out = model(ids, position_ids=almostlinear.shard_sequence(positions, dim=1))
    full = almostlinear.gather_sequence(out.logits, dim=1)     # every rank's slices, in order (no autograd)

What the user still does: shard every per-token input (ids, labels shifted *before* sharding, position ids or the
RoPE positions, padding masks) with the same lengths; pass position ids (a model that builds them from
arange(shard length) would give every shard positions 0..L-1); sum the parameter gradients over the group
(DDP or FSDP over the same ranks, or `all_reduce` of each .grad); take a loss over the whole sequence as the sum of
the ranks' token losses over the total token count.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .rewriter.backend import Backend

__all__ = ["context_parallel", "shard_sequence", "shard_lengths", "gather_sequence"]


def _group(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("almostlinear: context parallelism needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) first")
    return dist.group.WORLD if group is None else group


def context_parallel(model: torch.nn.Module, group: Any = None, *, method: str = "polynomial",
                     backend: Backend | None = None, **options: Any) -> torch.nn.Module:
    """`torch.compile(model, backend=Backend(context_parallel=group, method=method, **options), dynamic=False)`:
    the model then runs on this rank's contiguous shard of every sequence and attends over the whole sequence (the
    backend, with its reports, is `compiled.almostlinear_backend`).  Every rank of `group` must call the compiled
    model the same number of times (its attention sites exchange states or keys with the others)."""
    group = _group(group)
    backend = backend if backend is not None else Backend(context_parallel=group, method=method, **options)
    if not backend.options.context_parallel:
        raise ValueError("context_parallel(backend=...) needs a Backend built with context_parallel=<group>")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    compiled.almostlinear_backend = backend
    return compiled


def shard_lengths(total: int, world: int) -> list[int]:
    """Contiguous shard lengths of `total` tokens over `world` ranks (the first total % world ranks one longer).
    Every rank gets at least one token (an empty shard is not supported: its rank would trace a different graph)."""
    if int(total) < int(world):
        raise ValueError(f"{total} tokens cannot be split over {world} ranks: every rank needs at least one token")
    base, extra = divmod(int(total), int(world))
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_sequence(x: torch.Tensor, dim: int = 1, group: Any = None,
                   lengths: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` (`lengths`: every rank's, summing to x.shape[dim]; default
    :func:`shard_lengths`)."""
    import torch.distributed as dist

    group = _group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = list(lengths) if lengths is not None else shard_lengths(x.shape[dim], world)
    if len(lengths) != world or sum(lengths) != x.shape[dim] or min(lengths) < 1:
        raise ValueError(f"lengths must be {world} positive ints (every rank holds at least one token) summing to "
                         f"x.shape[{dim}] = {x.shape[dim]}; got {lengths}")
    return x.narrow(dim, sum(lengths[:rank]), lengths[rank])


def gather_sequence(x: torch.Tensor, dim: int = 1, group: Any = None) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order (shards may differ in length; no autograd)."""
    import torch.distributed as dist

    group = _group(group)
    world = dist.get_world_size(group)
    lengths: list = [None] * world
    dist.all_gather_object(lengths, int(x.shape[dim]), group=group)
    longest = max(lengths)
    padded = x.detach().movedim(dim, 0)
    if padded.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros(longest - padded.shape[0], *padded.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).movedim(0, dim)
