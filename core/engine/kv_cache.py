"""The paged KV cache: per-layer block pools and the allocator that hands blocks to sequences."""

from __future__ import annotations

from collections import OrderedDict
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
    """Hands out KV-cache blocks, reference-counted, with a prefix cache.

    A block whose tokens are all computed can be registered under the hash of its content (and
    of everything before it, see ``vlm.engine.prefix_cache``). When its last user frees it, it
    keeps its content and its hash, and joins the free list at the most-recent end: a later
    request with the same prefix takes it back (:meth:`take_cached`) instead of recomputing;
    :meth:`allocate` evicts least-recently-freed blocks first.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache blocks")  # the scheduler checks first
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        if old is not None:
            del self._block_of[old]
        self.ref_counts[block] = 1
        return block

    def free(self, blocks: list[int]) -> None:
        # a sequence's last blocks are the least likely to be shared: free them first, so that
        # they are evicted before its prefix
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def cached_block(self, content_hash: bytes) -> int | None:
        return self._block_of.get(content_hash)

    def take_cached(self, block: int) -> None:
        """One more user of a cached block (revived from the free list if nobody held it)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def register(self, block: int, content_hash: bytes) -> None:
        if content_hash not in self._block_of and block not in self._hash_of:
            self._block_of[content_hash] = block
            self._hash_of[block] = content_hash


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
