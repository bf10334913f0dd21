"""Tensor-parallel state. With no process group (the default) this is TP=1 and every op is local.

Layers in ``vlm.nn`` ask here for their shard, so a model written once runs under
``torchrun`` with gloo (CPU) or NCCL (GPU) without changes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if tp_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    world = tp_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
