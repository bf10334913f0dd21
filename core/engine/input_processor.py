"""Input processing: a prompt becomes a validated :class:`Sequence` the scheduler can run.

The plugin's preprocessor turns the prompt into :class:`ModelInputs`; this module checks what the
engine depends on (context length, cache capacity, vocabulary, explicit positions, bidirectional
spans, image placeholder counts) so that a bad request is a one-line :class:`InputError` before anything runs.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.engine.detokenizer import IncrementalDetokenizer
from vlm.engine.sequence import Sequence
from vlm.errors import InputError
from vlm.inputs import ModelInputs, Prompt
from vlm.sampling_params import SamplingParams


def placeholder_positions(inputs: ModelInputs) -> torch.Tensor | None:
    """Where the image features go in the prompt; the counts must agree before anything runs.

    An item with its own ``placeholder_token_id`` (a video) fills that token's positions; items
    are in prompt order, so each one's positions must hold its own placeholder."""
    images = getattr(inputs, "images", None) or []
    token_id = getattr(inputs, "image_token_id", None)
    if token_id is None:
        if images:
            raise InputError("the preprocessor returned images but no image_token_id; the plugin must set it")
        return None
    own = [
        token_id if getattr(image, "placeholder_token_id", None) is None else image.placeholder_token_id
        for image in images
    ]
    tokens = torch.tensor(inputs.token_ids)
    positions = torch.isin(tokens, torch.tensor(sorted({token_id, *own}))).nonzero().flatten()
    expected = sum(image.num_tokens for image in images)
    if positions.numel() != expected:
        raise InputError(
            f"the prompt has {positions.numel()} image placeholder tokens but its {len(images)} image(s) "
            f"need {expected}; let the preprocessor insert image placeholders (do not type them)"
        )
    if len(set(own)) > 1:
        wanted = torch.tensor(own).repeat_interleave(torch.tensor([image.num_tokens for image in images]))
        if not torch.equal(tokens[positions], wanted):
            raise InputError(
                "the prompt's image and video placeholders are not in the order of its images and videos; "
                "the plugin's preprocessor must list them in prompt order"
            )
    return positions if images else None


def check_positions(inputs: ModelInputs, position_dims: int) -> None:
    """Explicit positions, one column per prompt token: ``[3, T]`` for multimodal rope (Qwen2-VL),
    ``[T]`` for 1-D rope whose image tokens share positions (CogVLM)."""
    positions = getattr(inputs, "positions", None)
    if positions is None:
        return
    expected = (3, len(inputs.token_ids)) if position_dims == 3 else (len(inputs.token_ids),)
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != expected:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        layout = "one temporal/height/width column" if position_dims == 3 else "one position"
        raise InputError(
            f"the preprocessor's positions are {shape}, expected {list(expected)} ({layout} per prompt token, "
            f"the model's position_dims is {position_dims}); the plugin must fix its preprocessor"
        )


def check_bidirectional_spans(inputs: ModelInputs) -> None:
    """Spans of non-causal attention: sorted, disjoint ``[start, end)`` ranges of prompt positions."""
    spans = getattr(inputs, "bidirectional_spans", None)
    if not spans:
        return
    previous_end = 0
    for span in spans:
        start, end = span if isinstance(span, (tuple, list)) and len(span) == 2 else (None, None)
        if not (isinstance(start, int) and isinstance(end, int)) or not previous_end <= start < end <= len(
            inputs.token_ids
        ):
            raise InputError(
                f"the preprocessor's bidirectional span {span!r} is not a sorted, disjoint [start, end) range inside "
                f"the {len(inputs.token_ids)}-token prompt; the plugin must fix its preprocessor"
            )
        previous_end = end


class InputProcessor:
    """Preprocesses and validates requests for one loaded model.

    :param cache_capacity: tokens the whole KV cache holds (a prompt must fit with one new token).
    :param position_dims: the model's ``position_dims`` (3 for multimodal rope).
    """

    def __init__(
        self,
        preprocessor: Any,
        tokenizer: Any,
        *,
        vocab_size: int,
        max_model_len: int,
        cache_capacity: int,
        position_dims: int,
    ):
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.cache_capacity = cache_capacity
        self.position_dims = position_dims

    def preprocess(self, prompt: Prompt | ModelInputs) -> ModelInputs:
        return prompt if isinstance(prompt, ModelInputs) else self.preprocessor(prompt)

    def validate(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Raise :class:`InputError` for inputs the engine cannot run; return the placeholder positions."""
        prompt_len = len(inputs.token_ids)
        if prompt_len >= self.max_model_len:
            raise InputError(
                f"prompt of {prompt_len} tokens does not fit the context of {self.max_model_len} tokens "
                "(it needs room for at least one new token); shorten the prompt or raise --max-model-len"
            )
        if prompt_len + 1 > self.cache_capacity:
            raise InputError(
                f"prompt of {prompt_len} tokens exceeds the KV cache ({self.cache_capacity} tokens); raise --kv-cache-gib"
            )
        if max(inputs.token_ids) >= self.vocab_size or min(inputs.token_ids) < 0:
            raise InputError(f"prompt token ids must be in [0, {self.vocab_size})")
        check_positions(inputs, self.position_dims)
        check_bidirectional_spans(inputs)
        return placeholder_positions(inputs)

    def sequence(self, request_id: str, inputs: ModelInputs, params: SamplingParams, seed: int) -> Sequence:
        """A validated sequence for the scheduler; ``seed`` seeds its sampling unless ``params.seed`` does."""
        positions = self.validate(inputs)
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InputError(f"stop_token_ids must be in [0, {self.vocab_size}), the model's vocabulary")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed if params.seed is not None else seed)
        return Sequence(
            request_id=request_id,
            inputs=inputs,
            params=params,
            # a chat reply is a message of its own; a completion continues the prompt's text
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, [] if inputs.chat else inputs.token_ids, params.skip_special_tokens
            ),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
            placeholder_positions=positions,
        )
