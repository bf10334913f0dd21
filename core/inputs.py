"""What a preprocessor produces for the engine, and the text-only preprocessor.

A prompt is either a string (sent as is) or a list of chat messages in the OpenAI shape
(``{"role": "user", "content": "..."}``), rendered with the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from vlm.errors import InputError

Message = dict[str, Any]
Prompt = Union[str, list[Message], list[int]]


@dataclass
class ModelInputs:
    """One request's model inputs.

    :param token_ids: prompt token ids, image placeholders already expanded.
    :param images: per-image tensors the model's ``embed_images`` consumes (VLMs only).
    :param positions: explicit positions (e.g. ``[3, T]`` M-RoPE) when not ``0..T-1``.
    """

    token_ids: list[int]
    images: list[Any] = field(default_factory=list)
    positions: Any | None = None
    prompt: str | None = None


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
        return self.tokenizer.apply_chat_template(
            validate_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, prompt: Prompt, add_generation_prompt: bool = True) -> ModelInputs:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return ModelInputs(token_ids=list(prompt))
        if isinstance(prompt, list):
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
