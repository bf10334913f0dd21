"""The paged KV cache: per-layer block pools and the allocator that hands blocks to sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


class BlockAllocator:
    """A free list of block ids. Sequences own lists of blocks; freeing returns them here."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache blocks")  # the scheduler checks first
        return self._free.pop()

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """``num_layers`` pairs of ``[num_blocks, block_size, kv_heads, head_dim]`` tensors."""

    def __init__(self, shape: CacheShape, num_blocks: int, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        self.num_blocks = num_blocks
        dims = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        self.layers = [
            (torch.zeros(dims, dtype=dtype, device=device), torch.zeros(dims, dtype=dtype, device=device))
            for _ in range(shape.num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)


def blocks_for_budget(shape: CacheShape, dtype: torch.dtype, budget_bytes: float, needed_tokens: int) -> int:
    """Blocks that fit in the budget, but no more than ``needed_tokens`` could ever use."""
    by_budget = int(budget_bytes // shape.bytes_per_block(dtype))
    by_need = -(-needed_tokens // shape.block_size)
    return max(1, min(by_budget, by_need))
