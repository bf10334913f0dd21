"""Image embeddings computed once and reused: across turns of a chat, across requests that send
the same picture, and when a preempted sequence is recomputed. Keyed by the content hash the
preprocessor puts on each image; bounded by bytes, least recently used evicted first."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()

    def __len__(self) -> int:
        return len(self._entries)
