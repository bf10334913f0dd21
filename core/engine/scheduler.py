"""Which sequences run in the next forward step, and their KV-cache blocks.

Every step decodes all running sequences (one token each), then fills the remaining token
budget with prompt chunks of waiting sequences (chunked prefill), so new requests join the
batch between steps. When a decode needs a block and none is free, the most recently started
sequence is preempted: its blocks are freed and it is recomputed later, never dropped.

With prefix caching, a sequence about to start takes over the cached blocks of its longest
already-computed prefix (a second chat turn, a shared system prompt, the same image), and every
block that fills up is registered for others to reuse.

A prompt's bidirectional spans (``ModelInputs.bidirectional_spans``: tokens that attend to later
tokens of their span) are never cut: a chunk ends before a span it cannot hold whole, a span
longer than the step budget runs whole as the step's first prompt chunk (the step is then larger
than the budget), and a cached prefix never ends inside a span (its k/v would depend on tokens
after it, which the cache key does not cover).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vlm.engine.kv_cache import BlockAllocator
from vlm.engine.prefix_cache import hashes_for
from vlm.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
    ):
        self.allocator = allocator
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prompt_tokens = 0  # prompt tokens admitted, and how many came from the cache
        self.num_cached_tokens = 0
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.blocks))

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self._blocks_needed(seq, num_tokens)):
            seq.blocks.append(self.allocator.allocate())

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        # 1. decode every running sequence whose prompt is done, preempting the newest on shortage
        for seq in list(self.running):
            if seq not in self.running or seq.is_prefill:
                continue
            while self._blocks_needed(seq, seq.num_computed + 1) > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self._grow(seq, seq.num_computed + 1)
                step.decodes.append(seq)
        # 2. prompt chunks: running sequences mid-prompt first, then waiting ones in arrival order
        budget = self.max_num_batched_tokens - len(step.decodes)
        candidates = [s for s in self.running if s.is_prefill] + list(self.waiting)
        for seq in candidates:
            if budget <= 0:
                break
            if seq.status is Status.WAITING and len(self.running) >= self.max_num_seqs:
                break
            starting = seq.status is Status.WAITING
            # the prefix cache keeps k/v, not logits: a request that wants prompt log-probs computes
            # every prompt position (its blocks are still registered for others to reuse)
            if starting and self.enable_prefix_caching and not seq.needs_prompt_logprobs:
                self._take_cached_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed
            room = (len(seq.blocks) + self.allocator.num_free) * self.block_size - seq.num_computed
            count = min(remaining, budget, room)
            if seq.inputs.bidirectional_spans and count < remaining:
                count = self._keep_spans_whole(seq, count, room, first_chunk=not step.prefills)
            if count <= 0:
                if starting:
                    self._release(seq)
                break
            if starting:
                self.num_prompt_tokens += seq.num_tokens
                self.num_cached_tokens += seq.num_computed
            self._grow(seq, seq.num_computed + count)
            if seq.status is Status.WAITING:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            step.prefills.append((seq, count))
            budget -= count
        return step

    @staticmethod
    def _span_cut(seq: Sequence, position: int) -> tuple[int, int] | None:
        """The bidirectional span that ``position`` falls strictly inside (a boundary there would cut it)."""
        for start, end in seq.inputs.bidirectional_spans or ():
            if start < position < end:
                return start, end
        return None

    def _keep_spans_whole(self, seq: Sequence, count: int, room: int, first_chunk: bool) -> int:
        """``count`` new tokens, shortened so that the chunk ends before a span it would cut, or
        lengthened to the span's end when the span starts the chunk and nothing else runs first;
        0 when the span must wait for the next step (or for free blocks)."""
        span = self._span_cut(seq, seq.num_computed + count)
        if span is None:
            return count
        start, end = span
        if start > seq.num_computed:
            return start - seq.num_computed
        whole = end - seq.num_computed
        return whole if first_chunk and whole <= room else 0

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` on the cached blocks of its longest computed prefix (at least one token
        is always left to compute: its logits are needed), ending outside its bidirectional spans."""
        full_blocks = (seq.num_tokens - 1) // self.block_size
        while full_blocks and (span := self._span_cut(seq, full_blocks * self.block_size)) is not None:
            full_blocks = span[0] // self.block_size
        hashes = hashes_for(seq, self.block_size, full_blocks, [])
        for content_hash in hashes:
            block = self.allocator.cached_block(content_hash)
            if block is None:
                break
            self.allocator.take_cached(block)
            seq.blocks.append(block)
            seq.block_hashes.append(content_hash)
        seq.num_computed = len(seq.blocks) * self.block_size

    def register_full_blocks(self, seqs: list[Sequence]) -> None:
        """After a step: make the blocks that are now full and computed reusable by others."""
        if not self.enable_prefix_caching:
            return
        for seq in seqs:
            full = min(seq.num_computed // self.block_size, len(seq.blocks))
            if full > len(seq.block_hashes):
                seq.block_hashes = hashes_for(seq, self.block_size, full, seq.block_hashes)
                for index in range(full):
                    self.allocator.register(seq.blocks[index], seq.block_hashes[index])

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.grammar = None  # its matcher goes now, not when the last reference to the sequence does
