"""The data a preprocessor hands the engine: one request's token ids, images and positions.

This module does not import torch (``ImageInput`` only names it in annotations).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, Union

if TYPE_CHECKING:
    import torch

Message = dict[str, Any]
Prompt = Union[str, list[Message], list[int]]


@dataclass
class ImageInput:
    """One image of a request, preprocessed for the model.

    :param pixel_values: the pixels in the plugin's layout, e.g. ``[tiles, 3, H, W]`` float32.
    :param num_tokens: how many placeholder tokens (``ModelInputs.image_token_id``) this image
        fills in ``token_ids``; its embeddings must have exactly this many rows.
    :param key: content hash of ``pixel_values`` (:func:`pixel_values_key`), for the engine's
        image-embedding and prefix caches.
    :param extra: anything else the plugin's model needs (e.g. a tile grid). By convention
        ``extra["resized_size"] = (width, height)`` is the size the image was resized to, when
        the model writes grounding boxes in pixels of that image (Qwen2.5-VL).
    :param placeholder_token_id: the placeholder token this item fills when it is not
        ``ModelInputs.image_token_id`` (a video's ``<|video_pad|>`` in Qwen2-VL); ``None``: that one.
        Items stay in prompt order, whatever their placeholder.
    """

    pixel_values: torch.Tensor
    num_tokens: int
    key: str
    extra: dict[str, Any] = field(default_factory=dict)
    placeholder_token_id: int | None = None


def pixel_values_key(pixel_values: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of a tensor: equal keys mean equal pixels."""
    import torch  # called with a tensor in hand: torch is already imported

    tensor = pixel_values.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ModelInputs:
    """One request's model inputs.

    :param token_ids: prompt token ids, image placeholders already expanded.
    :param images: one :class:`ImageInput` per image, in prompt order (VLMs only).
    :param positions: explicit positions, one per prompt token: a ``[3, T]`` integer tensor
        (temporal, height, width) for M-RoPE models (``position_dims = 3``), or ``[T]`` for 1-D rope
        models whose image tokens share positions (CogVLM); ``None`` means ``0..T-1``.
    :param position_delta: with explicit positions, the offset of generated tokens: the token at
        sequence index ``i >= T`` sits at position ``i + position_delta`` (in all rows)
        (transformers' ``rope_deltas``: ``positions.max() + 1 - T``).
    :param image_token_id: the placeholder token that image embeddings replace, in order:
        ``token_ids.count(image_token_id) == sum(image.num_tokens for image in images)`` (items
        with their own ``placeholder_token_id``, such as videos, count theirs instead).
    :param bidirectional_spans: prompt token ranges ``[start, end)`` in which attention is not
        causal: every token of a span also sees the span's later tokens (Gemma 3 over each image's
        tokens, PaliGemma over its prefix). Sorted, disjoint, inside the prompt; ``None``: causal
        everywhere. The scheduler keeps each span in one prefill chunk.
    :param chat: the prompt was rendered from chat messages, so the reply is a message of its own:
        its text is ``tokenizer.decode(new_ids)`` (as transformers and OpenAI chat clients have it:
        no SentencePiece word-start space before the first word). Otherwise the reply continues the
        prompt's text: ``decode(prompt + new) - decode(prompt)`` (a completion keeps that space).
    """

    token_ids: list[int]
    images: list[Any] = field(default_factory=list)
    positions: Any | None = None
    position_delta: int = 0
    prompt: str | None = None
    image_token_id: int | None = None
    chat: bool = False
    bidirectional_spans: list[tuple[int, int]] | None = None


class Preprocessor(Protocol):
    tokenizer: Any

    def __call__(self, prompt: Prompt, add_generation_prompt: bool = True) -> ModelInputs: ...


def is_token_ids(prompt: Any) -> TypeGuard[list[int]]:
    """A prompt given as token ids (a non-empty list of ints) rather than text or messages."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
