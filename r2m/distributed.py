"""torch.distributed and DeepSpeed facts R2M reads: this process's rank, the world size, gathers, agreement,
and whether ZeRO-3 partitions a model's parameters. One process without a process group is rank 0 of 1."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(tensor: Tensor, world: int) -> Tensor:
    """Concatenate every rank's equal-sized 1-D slice in rank order (identity on one process)."""
    if world == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], device=tensor.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must pass the same number of samples to update, got "
                         f"{[int(s) for s in sizes]}")
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def agree(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all processes of the default process group (``value`` itself on one process).

    Every rank must call it at the same point: a decision made from it (how many fallback forwards to run) is then
    the same everywhere, as a sharded model's collective forward needs.
    """
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def zero3_partitioned(model: nn.Module | Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions a module's parameters or this parameter (it tags each with ``ds_id``)."""
    params = [model] if isinstance(model, Tensor) else model.parameters()
    return any(hasattr(p, "ds_id") for p in params)


__all__ = ["agree", "all_gather", "rank_and_world", "zero3_partitioned"]
