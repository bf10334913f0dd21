"""Drives a loaded model through the engine's own :class:`ModelRunner` (flat batches over a paged
KV cache, image features written over placeholders), one hand-built step at a time, and returns
the hidden states of every token, which the checks compare."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from vlm.engine.input_processor import placeholder_positions
from vlm.engine.kv_cache import CacheShape, KVCache
from vlm.engine.model_runner import ModelRunner
from vlm.engine.scheduler import ScheduledStep
from vlm.engine.sequence import Sequence
from vlm.inputs import ModelInputs
from vlm.sampling_params import SamplingParams


class Harness:
    def __init__(self, model: Any, text: Any, dtype: torch.dtype, block_size: int = 4, num_blocks: int = 512):
        shape = CacheShape(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, block_size)
        self.model = model
        self.block_size = block_size
        self.cache = KVCache(shape, num_blocks, dtype, torch.device("cpu"))
        self.runner = ModelRunner(model, self.cache, torch.device("cpu"))
        self._count = 0

    def sequence(self, inputs: ModelInputs, extra_tokens: int = 0) -> Sequence:
        """A sequence with cache blocks for its prompt and ``extra_tokens`` more."""
        self._count += 1
        seq = Sequence(
            request_id=f"conformance-{self._count}",
            inputs=inputs,
            params=SamplingParams(),
            detokenizer=None,  # type: ignore[arg-type]  # the harness never detokenizes
            placeholder_positions=placeholder_positions(inputs),
        )
        total = len(inputs.token_ids) + extra_tokens
        seq.blocks = [self.cache.allocator.allocate() for _ in range(-(-total // self.block_size))]
        return seq

    def step(
        self, decodes: Seq[Sequence] = (), prefills: Seq[tuple[Sequence, int]] = (), embeds_of: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward; returns the flat input ids and the hidden states of every token.

        :param embeds_of: pass ``inputs_embeds`` = the embeddings of these token ids (one per token
            of the batch) instead of letting the model embed ``input_ids``.
        """
        inputs_embeds = None
        if embeds_of is not None:
            with torch.inference_mode():
                inputs_embeds = self.model.embed_tokens(torch.tensor(embeds_of, dtype=torch.long))
        result = self.runner.forward(ScheduledStep(decodes=list(decodes), prefills=list(prefills)), inputs_embeds)
        return result.input_ids, result.hidden_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compute_logits(hidden)
