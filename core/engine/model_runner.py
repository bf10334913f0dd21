"""Turns a scheduled step into one flat forward pass and returns the logits to sample from."""

from __future__ import annotations

import torch

from vlm.engine.kv_cache import KVCache
from vlm.engine.scheduler import ScheduledStep
from vlm.engine.sequence import Sequence
from vlm.forward_batch import ForwardBatch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.shape.block_size
        self._offsets = torch.arange(self.block_size, device=device)

    def _slots(self, seqs: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """Cache slots of positions ``0..length-1`` of each sequence, ``[S, max(length)]`` padded with 0."""
        max_len = max(lengths)
        max_blocks = -(-max_len // self.block_size)
        table = torch.zeros((len(seqs), max_blocks), dtype=torch.long)
        for i, seq in enumerate(seqs):
            blocks = seq.blocks[:max_blocks]
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        table = table.to(self.device)
        slots = (table.unsqueeze(-1) * self.block_size + self._offsets).view(len(seqs), -1)
        return slots[:, :max_len]

    def prepare(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, torch.Tensor, list[Sequence]]:
        """Flat token ids, positions, the batch metadata, which rows to take logits of, and their sequences."""
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_index: list[int] = []
        sampled: list[Sequence] = []
        for seq in step.decodes:
            token_ids.extend(seq.token_ids(seq.num_computed, seq.num_computed + 1))
            positions.append(seq.num_computed)
            query_lens.append(1)
            context_lens.append(seq.num_computed + 1)
            logits_index.append(len(token_ids) - 1)
            sampled.append(seq)
        prefill_slots: list[torch.Tensor | None] = []
        for seq, count in step.prefills:
            start = seq.num_computed
            token_ids.extend(seq.token_ids(start, start + count))
            positions.extend(range(start, start + count))
            query_lens.append(count)
            context_lens.append(start + count)
            prefill_slots.append(self._slots([seq], [start + count])[0] if start else None)
            if start + count == seq.num_tokens:
                logits_index.append(len(token_ids) - 1)
                sampled.append(seq)

        all_seqs = step.decodes + [seq for seq, _ in step.prefills]
        slot_list = []
        for seq, qlen, clen in zip(all_seqs, query_lens, context_lens):
            for pos in range(clen - qlen, clen):
                slot_list.append(seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size)

        decode_slots = decode_mask = None
        if step.decodes:
            lengths = context_lens[: len(step.decodes)]
            decode_slots = self._slots(step.decodes, lengths)
            lens = torch.tensor(lengths, device=self.device)
            decode_mask = (torch.arange(decode_slots.shape[1], device=self.device) < lens.unsqueeze(1))[:, None, None, :]

        batch = ForwardBatch(
            query_lens=query_lens,
            context_lens=context_lens,
            num_decodes=len(step.decodes),
            slot_mapping=torch.tensor(slot_list, dtype=torch.long, device=self.device),
            kv_caches=self.kv_cache.layers,
            block_size=self.block_size,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefill_slots=prefill_slots,
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)
        logits_rows = torch.tensor(logits_index, dtype=torch.long, device=self.device)
        return input_ids, position_ids, batch, logits_rows, sampled

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> tuple[torch.Tensor | None, list[Sequence]]:
        input_ids, positions, batch, logits_rows, sampled = self.prepare(step)
        hidden_states = self.model(input_ids, positions, batch)
        for seq, count in step.prefills:
            seq.num_computed += count
        for seq in step.decodes:
            seq.num_computed += 1
        if not sampled:
            return None, sampled
        return self.model.compute_logits(hidden_states[logits_rows]), sampled
