"""What a computation needs to run unchanged under ``torch.distributed`` (e.g. ``torchrun``):
its rank and world size, and collectives that are no-ops in a single process.

:func:`cnnwidgets.dissect` and :func:`cnnwidgets.evaluate` share these: each rank works on its
shard of the data set, and what the ranks found is merged with exact integer sums or by
concatenating rows, so the result equals the one-process result bit for bit.
"""
from __future__ import annotations

import torch

__all__ = ["all_gather_cat", "all_reduce", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over the ranks (``op``: "sum", "min" or "max"); ``t`` itself in one
    process. The input is not changed."""
    if rank_and_world()[1] == 1:
        return t
    dist = torch.distributed
    t = t.clone()
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                           "max": dist.ReduceOp.MAX}[op])
    return t


def all_gather_cat(t: torch.Tensor, dim: int, pad_value) -> torch.Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may
    differ between ranks; ``pad_value`` fills the transfer and is cut off again)."""
    if rank_and_world()[1] == 1:
        return t
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([t.shape[dim]], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    top = int(max(s.item() for s in sizes))
    pad = list(t.shape)
    pad[dim] = top - t.shape[dim]
    padded = torch.cat([t, torch.full(pad, pad_value, dtype=t.dtype)], dim)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes)], dim)
