"""Turns a scheduled step into one flat forward pass and returns the logits to sample from."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple, cast

import torch

from vlm.engine.image_cache import ImageEmbeddingCache
from vlm.engine.kv_cache import KVCache
from vlm.engine.scheduler import ScheduledStep
from vlm.engine.sequence import Sequence
from vlm.errors import InputError
from vlm.nn.forward_batch import ForwardBatch, ImageSpan
from vlm.platform import vision_batches


class PromptRows(NamedTuple):
    """Rows of a step whose logits give prompt log-probs: each row's logits predict the next prompt token."""

    rows: list[int]  # flat rows of the step's hidden states
    targets: list[int]  # the prompt token each row predicts
    spans: list[tuple[Sequence, int]]  # (sequence, how many of the rows are its), in row order


class StepResult(NamedTuple):
    input_ids: torch.Tensor  # [T] the flat batch's token ids
    hidden_states: torch.Tensor  # [T, hidden], one row per token
    logits_rows: torch.Tensor  # rows of hidden_states whose next token is sampled
    sampled: list[Sequence]  # the sequences of those rows, in order
    prompt_rows: PromptRows | None = None  # rows whose logits give prompt log-probs (SamplingParams.prompt_logprobs)


#: prompt positions turned into log-probs at once (bounds the [rows, vocab] fp32 temporaries)
PROMPT_LOGPROBS_CHUNK = 256


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        image_cache: ImageEmbeddingCache | None = None,
    ):
        # an nn.Module that follows vlm.plugin.ModelProtocol (a type cannot say both)
        self.model: Any = model
        self.kv_cache = kv_cache
        self.device = device
        self.image_cache = image_cache or ImageEmbeddingCache()
        self.block_size = kv_cache.shape.block_size
        # 3 for multimodal rope (Qwen2-VL): every token gets (temporal, height, width) positions
        self.position_dims = getattr(model, "position_dims", 1)

    def prepare(
        self, step: ScheduledStep
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, torch.Tensor, list[Sequence], PromptRows | None]:
        """Flat token ids, positions, the batch metadata, which rows to sample from and their
        sequences, and the rows whose logits give prompt log-probs (``None`` when no prompt wants them)."""
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_index: list[int] = []
        sampled: list[Sequence] = []
        explicit_positions: list[tuple[int, torch.Tensor]] = []  # (flat offset, [3, n] or [n] prompt positions)
        for seq in step.decodes:
            index = seq.num_computed
            token_ids.extend(seq.token_ids(index, index + 1))
            if seq.inputs.positions is not None and index < len(seq.inputs.token_ids):
                # a prompt's last token can arrive as a one-token step (after preemption and a prefix hit)
                explicit_positions.append((len(token_ids) - 1, seq.inputs.positions[..., index : index + 1]))
                positions.append(index)
            else:
                positions.append(index + seq.inputs.position_delta)
            query_lens.append(1)
            context_lens.append(seq.num_computed + 1)
            logits_index.append(len(token_ids) - 1)
            sampled.append(seq)
        images: list[ImageSpan] = []
        self._embed_images([seq for seq, _ in step.prefills if seq.inputs.images and seq.image_embeds is None])
        prompt_rows = PromptRows([], [], [])
        for seq, count in step.prefills:
            start = seq.num_computed
            if seq.needs_prompt_logprobs:
                self._add_prompt_rows(prompt_rows, seq, start, count, flat_offset=len(token_ids))
            if seq.image_embeds is not None:
                span = self._image_span(seq, start, count, flat_offset=len(token_ids))
                if span is not None:
                    images.append(span)
            if seq.inputs.positions is not None and start < len(seq.inputs.token_ids):
                end = min(start + count, len(seq.inputs.token_ids))
                explicit_positions.append((len(token_ids), seq.inputs.positions[..., start:end]))
            token_ids.extend(seq.token_ids(start, start + count))
            prompt_len, delta = len(seq.inputs.token_ids), seq.inputs.position_delta
            positions.extend(i if i < prompt_len else i + delta for i in range(start, start + count))
            query_lens.append(count)
            context_lens.append(start + count)
            if start + count == seq.num_tokens:
                logits_index.append(len(token_ids) - 1)
                sampled.append(seq)

        all_seqs = step.decodes + [seq for seq, _ in step.prefills]
        slot_list = []
        for seq, qlen, clen in zip(all_seqs, query_lens, context_lens):
            for pos in range(clen - qlen, clen):
                slot_list.append(seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size)

        max_blocks = max(len(seq.blocks) for seq in all_seqs)
        block_tables = torch.zeros((len(all_seqs), max_blocks), dtype=torch.int32)
        for i, seq in enumerate(all_seqs):
            block_tables[i, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        prefill_lens = query_lens[len(step.decodes) :]
        prefill_query_start = torch.tensor([0, *itertools.accumulate(prefill_lens)], dtype=torch.int32)
        batch = ForwardBatch(
            query_lens=query_lens,
            context_lens=context_lens,
            num_decodes=len(step.decodes),
            slot_mapping=torch.tensor(slot_list, dtype=torch.long, device=self.device),
            kv_caches=self.kv_cache.layers,
            block_size=self.block_size,
            block_tables=block_tables.to(self.device),
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            prefill_query_start=prefill_query_start.to(self.device),
            images=images,
            image_token_mask=self._image_token_mask(images, len(token_ids)),
            prefill_spans=self._prefill_spans(step.prefills),
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        position_ids = torch.tensor(positions, dtype=torch.long)
        if self.position_dims == 3:
            position_ids = position_ids.expand(3, -1).clone()
        for offset, prompt_positions in explicit_positions:
            position_ids[..., offset : offset + prompt_positions.shape[-1]] = prompt_positions
        position_ids = position_ids.to(self.device)
        logits_rows = torch.tensor(logits_index, dtype=torch.long, device=self.device)
        return input_ids, position_ids, batch, logits_rows, sampled, (prompt_rows if prompt_rows.rows else None)

    @staticmethod
    def _add_prompt_rows(prompt_rows: PromptRows, seq: Sequence, start: int, count: int, flat_offset: int) -> None:
        """The rows of this chunk ``[start, start + count)`` whose logits predict prompt tokens that
        have no log-prob yet (after a preemption, the recomputed ones already have theirs)."""
        assert seq.prompt_logprobs is not None
        prompt = seq.inputs.token_ids
        done = len(seq.prompt_logprobs)  # tokens [0, done) have an entry: position done - 1 predicts the next
        if start > done - 1:
            raise RuntimeError(
                f"request {seq.request_id}: prompt positions {done - 1}..{start - 1} were not computed, so their "
                "prompt log-probs are missing (a prefix-cache hit for a request that wants prompt_logprobs)"
            )
        first, last = done - 1, min(start + count, len(prompt) - 1)
        if first >= last:
            return
        prompt_rows.rows.extend(range(flat_offset + first - start, flat_offset + last - start))
        prompt_rows.targets.extend(prompt[first + 1 : last + 1])
        prompt_rows.spans.append((seq, last - first))

    def _embed_images(self, seqs: list[Sequence]) -> None:
        """Give each sequence its image embeddings: from the cache, else one batched encode."""
        found: dict[str, torch.Tensor | None] = {}
        todo = []
        for seq in seqs:
            for image in seq.inputs.images:
                if image.key in found:
                    continue
                cached = self.image_cache.get(image.key)
                if cached is None:
                    todo.append(image)
                    found[image.key] = None
                else:
                    found[image.key] = cached
        for group in vision_batches(self.device, todo):
            # preprocessors make pixels on the CPU; the tower runs where the model is
            on_device = [dataclasses.replace(image, pixel_values=image.pixel_values.to(self.device)) for image in group]
            for image, embeds in zip(group, self.model.embed_images(on_device)):
                if embeds.shape[0] != image.num_tokens:
                    raise InputError(
                        f"the model produced {embeds.shape[0]} features for an image that has "
                        f"{image.num_tokens} placeholder tokens; the plugin's preprocessor and model disagree"
                    )
                found[image.key] = embeds
                self.image_cache.put(image.key, embeds)
        for seq in seqs:
            seq.image_embeds = torch.cat([cast(torch.Tensor, found[image.key]) for image in seq.inputs.images])

    def _prefill_spans(self, prefills: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """``[prefill tokens, 2]``: each prefill token's bidirectional span ``[start, end)`` in its
        sequence (``start == end`` outside spans); ``None`` when no span meets the step's chunks."""
        rows: list[torch.Tensor] = []
        found = False
        for seq, count in prefills:
            chunk = torch.zeros((count, 2), dtype=torch.int32)
            begin = seq.num_computed
            for start, end in seq.inputs.bidirectional_spans or ():
                first, last = max(start, begin), min(end, begin + count)
                if first < last:  # the scheduler keeps spans whole: the chunk holds all of it
                    chunk[first - begin : last - begin] = torch.tensor([start, end], dtype=torch.int32)
                    found = True
            rows.append(chunk)
        return torch.cat(rows).to(self.device) if found else None

    def _image_token_mask(self, images: list[ImageSpan], num_tokens: int) -> torch.Tensor | None:
        """``[T]`` bool, True at the flat rows that are image tokens; ``None`` when the step has none."""
        if not images:
            return None
        mask = torch.zeros(num_tokens, dtype=torch.bool, device=self.device)
        for span in images:
            mask[span.token_index] = True
        return mask

    def _image_span(self, seq: Sequence, start: int, count: int, flat_offset: int) -> ImageSpan | None:
        """The image rows that land in this chunk ``[start, start + count)`` of the prompt."""
        positions, embeds = seq.placeholder_positions, seq.image_embeds
        assert positions is not None and embeds is not None  # only sequences with images get here
        first = int(torch.searchsorted(positions, start))
        last = int(torch.searchsorted(positions, start + count))
        if first == last:
            return None
        index = positions[first:last] - start + flat_offset
        return ImageSpan(token_index=index.to(self.device), embeds=embeds[first:last])

    @torch.inference_mode()
    def forward(self, step: ScheduledStep, inputs_embeds: torch.Tensor | None = None) -> StepResult:
        """One forward pass over the step's flat batch; the scheduled tokens count as computed after it.

        :param inputs_embeds: embeddings to use instead of the model's own for the batch's tokens
            (the conformance kit checks that a model honours them); by default the core embeds the
            tokens itself only when it has image features to write over placeholders.
        """
        input_ids, positions, batch, logits_rows, sampled, prompt_rows = self.prepare(step)
        if inputs_embeds is None and batch.images:
            # the core writes image features over the placeholder tokens, for every VLM plugin
            inputs_embeds = self.model.embed_tokens(input_ids)
            for span in batch.images:
                inputs_embeds[span.token_index] = span.embeds.to(inputs_embeds.dtype)
        hidden_states = self.model(input_ids, positions, batch, inputs_embeds=inputs_embeds)
        for seq, count in step.prefills:
            seq.num_computed += count
        for seq in step.decodes:
            seq.num_computed += 1
        return StepResult(input_ids, hidden_states, logits_rows, sampled, prompt_rows)

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run the step; the logits of every sequence that samples a token now, and those sequences.

        Sequences that want prompt log-probs get those of this step's prompt chunk appended to
        ``seq.prompt_logprobs`` (their logits come from the same ``compute_logits`` call, so
        tensor-parallel ranks meet in the same collectives).
        """
        result = self.forward(step)
        prompt = result.prompt_rows
        num_sampled = len(result.sampled)
        if prompt is None:
            if not num_sampled:
                return None, result.sampled
            return self.model.compute_logits(result.hidden_states[result.logits_rows]), result.sampled
        rows = torch.cat([result.logits_rows, torch.tensor(prompt.rows, dtype=torch.long, device=self.device)])
        logits = self.model.compute_logits(result.hidden_states[rows])
        self._record_prompt_logprobs(logits[num_sampled:], prompt)
        return (logits[:num_sampled] if num_sampled else None), result.sampled

    def _record_prompt_logprobs(self, logits: torch.Tensor, prompt: PromptRows) -> None:
        """Append each row's ``{target: logprob, top-k...}`` to its sequence's ``prompt_logprobs``."""
        targets = torch.tensor(prompt.targets, dtype=torch.long, device=logits.device)
        owners = [seq for seq, count in prompt.spans for _ in range(count)]
        max_k = max(seq.params.prompt_logprobs or 0 for seq, _ in prompt.spans)
        entries: list[dict[int, float]] = []
        for begin in range(0, logits.shape[0], PROMPT_LOGPROBS_CHUNK):
            end = begin + PROMPT_LOGPROBS_CHUNK
            logprobs = logits[begin:end].float().log_softmax(-1)
            chosen = logprobs.gather(1, targets[begin:end, None]).squeeze(1).tolist()
            top_ids: list[list[int]] = [[] for _ in chosen]
            top_values: list[list[float]] = [[] for _ in chosen]
            if max_k:
                top = torch.topk(logprobs, max_k, dim=-1)
                top_ids, top_values = top.indices.tolist(), top.values.tolist()
            for i, value in enumerate(chosen):
                k = owners[begin + i].params.prompt_logprobs or 0
                entry = {prompt.targets[begin + i]: value}
                entry.update(zip(top_ids[i][:k], top_values[i][:k]))
                entries.append(entry)
        index = 0
        for seq, count in prompt.spans:
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs.extend(entries[index : index + count])
            index += count
