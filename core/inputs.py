"""What a preprocessor produces for the engine, and the text-only preprocessor.

A prompt is either a string (sent as is) or a list of chat messages in the OpenAI shape
(``{"role": "user", "content": "..."}``), rendered with the tokenizer's chat template.

A message's content may also be a list of parts, as OpenAI's API and transformers' chat templates
take them: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <source>}`` (also with
``"url"``, ``"path"`` or ``"base64"`` instead of ``"image"``) and
``{"type": "image_url", "image_url": {"url": ...}}``. :func:`normalize_messages` rewrites every
image part as ``{"type": "image", "image": <source>}`` (what transformers' templates test for) and
:func:`iter_image_parts` lists the sources in prompt order; ``vlm.images.load_image`` loads them.

This module does not import torch (``ImageInput`` only names it in annotations).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

from vlm.errors import InputError

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
    """

    pixel_values: torch.Tensor
    num_tokens: int
    key: str
    extra: dict[str, Any] = field(default_factory=dict)


def pixel_values_key(pixel_values: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of a tensor: equal keys mean equal pixels."""
    import torch  # called with a tensor in hand: torch is already imported

    tensor = pixel_values.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class ModelInputs:
    """One request's model inputs.

    :param token_ids: prompt token ids, image placeholders already expanded.
    :param images: one :class:`ImageInput` per image, in prompt order (VLMs only).
    :param positions: M-RoPE positions, a ``[3, T]`` integer tensor (temporal, height, width per
        prompt token), for models with ``position_dims = 3``; ``None`` means ``0..T-1``.
    :param position_delta: with explicit positions, the offset of generated tokens: the token at
        sequence index ``i >= T`` sits at position ``i + position_delta`` in all three rows
        (transformers' ``rope_deltas``: ``positions.max() + 1 - T``).
    :param image_token_id: the placeholder token that image embeddings replace, in order:
        ``token_ids.count(image_token_id) == sum(image.num_tokens for image in images)``.
    """

    token_ids: list[int]
    images: list[Any] = field(default_factory=list)
    positions: Any | None = None
    position_delta: int = 0
    prompt: str | None = None
    image_token_id: int | None = None


class Preprocessor(Protocol):
    tokenizer: Any

    def __call__(self, prompt: Prompt, add_generation_prompt: bool = True) -> ModelInputs: ...


def validate_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise InputError(f"message {i} has role {message['role']!r}; use system, user, assistant or tool")
    return messages


class TextPreprocessor:
    """Tokenizes plain prompts, renders chat messages with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(
                "this model's tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                "send a plain prompt string instead of chat messages"
            )
        # text-only chat templates expect a string: join OpenAI-style text parts
        flat = [
            {**m, "content": "".join(p.get("text", "") for p in m["content"])} if isinstance(m.get("content"), list) else m
            for m in validate_messages(messages)
        ]
        return self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, prompt: Prompt, add_generation_prompt: bool = True) -> ModelInputs:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return ModelInputs(token_ids=list(prompt))
        if isinstance(prompt, list):
            if has_image_parts(prompt):
                raise InputError("this model reads text only: remove the image parts, or serve a vision-language model")
            text = self.render(prompt, add_generation_prompt)
            # the template already wrote BOS where the model wants it
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str):
            text = prompt
            ids = self.tokenizer(text)["input_ids"]
        else:
            raise InputError(f"a prompt must be a string, a list of messages or token ids, not {type(prompt).__name__}")
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        return ModelInputs(token_ids=list(ids), prompt=text)


IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")


def _image_source(part: dict[str, Any], where: str) -> Any:
    """The image source of an image part (``type`` "image" or "image_url")."""
    if part["type"] == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not url:
            raise InputError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
        return url
    keys = [key for key in IMAGE_SOURCE_KEYS if part.get(key) is not None]
    if len(keys) != 1:
        found = f"got {', '.join(map(repr, keys))}" if keys else "got none"
        raise InputError(f"{where}: an image part needs exactly one of 'image', 'url', 'path' or 'base64' ({found})")
    source = part[keys[0]]
    if keys[0] == "base64":
        if not isinstance(source, str):
            raise InputError(f"{where}: 'base64' must be a string of base64 image data")
        try:
            return base64.b64decode(source.split(",", 1)[-1], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{where}: 'base64' is not valid base64 ({exc}); re-encode the image") from None
    return source


def normalize_messages(messages: Any) -> list[Message]:
    """Validate messages and rewrite content parts into the shape chat templates expect.

    String contents are kept; list contents become ``{"type": "text", "text": ...}`` and
    ``{"type": "image", "image": <source>}`` parts. The input is not modified.

    :raises InputError: a malformed message or part, or a part type other than text / image.
    """
    out = []
    for i, message in enumerate(validate_messages(messages)):
        content = message["content"]
        if isinstance(content, str) or content is None:
            out.append(dict(message))
            continue
        if not isinstance(content, list):
            raise InputError(
                f"message {i} content must be a string or a list of parts, not {type(content).__name__}"
            )
        parts = []
        for j, part in enumerate(content):
            where = f"message {i} part {j}"
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, dict) or "type" not in part:
                raise InputError(f"{where} must be a dict with a 'type' ('text' or 'image'), got {part!r:.80}")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"{where}: a text part needs {{'text': <string>}}")
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] in ("image", "image_url"):
                parts.append({"type": "image", "image": _image_source(part, where)})
            else:
                raise InputError(f"{where} has type {part['type']!r}; this engine takes 'text', 'image' and 'image_url' parts")
        out.append({**message, "content": parts})
    return out


def iter_image_parts(messages: list[Message]) -> Iterator[Any]:
    """The image sources of (normalized or raw) messages, in prompt order."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                yield _image_source(part, f"message {i} part {j}")


def has_image_parts(prompt: Any) -> bool:
    """Does this prompt (a string, token ids or messages) carry images?"""
    if not isinstance(prompt, list):
        return False
    return any(True for _ in iter_image_parts([m for m in prompt if isinstance(m, dict)]))
