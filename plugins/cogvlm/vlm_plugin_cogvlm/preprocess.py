"""CogVLM's prompts and pixels, as the original ``build_conversation_input_ids`` makes them.

- Token ids: BOS, then (when the conversation has its one picture) one placeholder per image
  token (boi, the patch features, eoi), then the conversation rendered with the checkpoint's
  ``template_version`` and tokenized without special tokens:

  =========  ==============================================================================
  ``base``   the question as it is (earlier turns are not shown, as in the original)
  ``chat``   ``Question: q1 Answer: a1\\n`` per earlier turn, then ``Question: q Answer:``
  ``vqa``    the same with ``Short answer:``
  =========  ==============================================================================

  A plain string prompt (and ``vlmrun --no-chat-template``) is the ``base`` rendering of that
  text; chat messages use the checkpoint's template.
- Positions (the original ``build_position_ids``): text tokens count up one by one; inside the
  picture boi, the first patch and eoi each take the next position and every other patch shares
  the first patch's. Generated tokens continue after the last prompt position
  (``ModelInputs.position_delta``).
- Pixels: ``Resize((S, S), BICUBIC)``, ``ToTensor``, ``Normalize(CLIP mean, std)`` as torchvision
  computes them on a PIL image, written with PIL and numpy (no torchvision): PIL's bicubic resize,
  then ``x / 255`` and ``(x - mean) / std`` in float32. Pictures become RGB with PIL's
  ``convert("RGB")``, as CogVLM's demos open them (no compositing of transparency).

CogVLM was trained with one picture per conversation, always placed right after BOS: a second
picture is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm.plugin import (
    ImageInput,
    InputError,
    ModelInputs,
    load_image,
    normalize_messages,
    pixel_values_key,
)
from vlm_plugin_cogvlm.config import CogVLMSettings

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: the picture always follows BOS, so its boi, patches and eoi sit at these positions; the model
#: routes an image's last token (eoi) to the language expert by its position (see model.py)
BOI_POSITION = 1
EOI_POSITION = BOI_POSITION + 2

#: CogVLM2's image placeholder (Llama 3's first reserved token, id 128002, which the original
#: code writes as ``tokenizer.pad_token_id = 128002``); CogVLM 1 uses the Vicuna tokenizer's pad
COGVLM2_PLACEHOLDER = "<|reserved_special_token_0|>"

MAX_IMAGES = 1


def render(template: str, history: Sequence[tuple[str, str]], query: str) -> str:
    """The conversation as CogVLM's ``template_version`` writes it (see the module docstring)."""
    if template == "base":
        return query
    answer = "Short answer:" if template == "vqa" else "Answer:"
    earlier = "".join(f"Question: {q} {answer} {a}\n" for q, a in history)
    return f"{earlier}Question: {query} {answer}"


def positions_of(num_tokens: int, image_tokens: int) -> list[int]:
    """``build_position_ids`` for BOS, ``image_tokens`` image tokens (0: none) and text after them."""
    if not image_tokens:
        return list(range(num_tokens))
    image = [BOI_POSITION] + [BOI_POSITION + 1] * (image_tokens - 2) + [EOI_POSITION]
    after = range(EOI_POSITION + 1, EOI_POSITION + 1 + num_tokens - 1 - image_tokens)
    return [0, *image, *after]


def image_pixels(image: Any, size: int):
    """``[1, 3, size, size]`` float32: torchvision's Resize((size, size), BICUBIC) + ToTensor +
    Normalize(CLIP) on a PIL image, in PIL and numpy."""
    import numpy as np
    import torch
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    values = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((values - mean) / std))[None]


class CogVLMPreprocessor:
    """Prompts (text, chat messages with at most one picture, token ids) -> :class:`ModelInputs`."""

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        self.tokenizer = tokenizer
        self.settings = CogVLMSettings(hf_config)
        self.model_path = Path(model_path)
        self.image_token_id = self._placeholder_id()
        self.bos_token_id = tokenizer.bos_token_id
        if self.bos_token_id is None:
            self.bos_token_id = getattr(hf_config, "bos_token_id", None)
        if self.bos_token_id is None:
            raise InputError(f"the tokenizer in {self.model_path} has no BOS token, which CogVLM's prompts start with")

    def _placeholder_id(self) -> int:
        if self.settings.version == 2:
            token_id = self.tokenizer.convert_tokens_to_ids(COGVLM2_PLACEHOLDER)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise InputError(
                    f"the tokenizer in {self.model_path} has no {COGVLM2_PLACEHOLDER} token (CogVLM2's image "
                    "placeholder); use the checkpoint's Llama 3 tokenizer"
                )
            return int(token_id)
        # CogVLM 1: the Vicuna tokenizer's pad token (<unk>, 0), as build_conversation_input_ids uses it
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id, 0):
            if token_id is not None:
                return int(token_id)
        raise AssertionError("unreachable")

    # -- prompts ------------------------------------------------------------------------------

    def __call__(self, prompt: Any, add_generation_prompt: bool = True) -> ModelInputs:
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) and prompt:
            if self.image_token_id in prompt:
                raise InputError(
                    "a token-id prompt cannot carry a picture (it holds CogVLM's image placeholder id "
                    f"{self.image_token_id}); send chat messages with an image part instead"
                )
            return ModelInputs(token_ids=list(prompt), image_token_id=self.image_token_id)
        if isinstance(prompt, str):
            return self._inputs(prompt, [], chat=False)
        if isinstance(prompt, list):
            history, query, sources = self._conversation(prompt, add_generation_prompt)
            return self._inputs(render(self.settings.template, history, query), sources, chat=True)
        raise InputError(f"a prompt must be a string, a list of messages or token ids, not {type(prompt).__name__}")

    def raw_prompt(self, text: str, images: Sequence[Any] = ()) -> ModelInputs:
        """A prompt without the template (``base``): BOS, the picture, then ``text`` as it is."""
        return self._inputs(text, list(images), chat=False)

    def _conversation(
        self, messages: list[Any], add_generation_prompt: bool
    ) -> tuple[list[tuple[str, str]], str, list[Any]]:
        """Messages -> (earlier (question, answer) turns, the question now, picture sources).

        System messages go before the next question (CogVLM has no system turn); consecutive
        messages of one role are joined by newlines.
        """
        turns: list[list[str]] = []  # [question, answer] pairs in order
        sources: list[Any] = []
        pending: list[str] = []  # system text waiting for the next question
        for message in normalize_messages(messages):
            role, content = message.get("role"), message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            text = "\n".join(p.get("text", "") for p in parts if p.get("type") == "text")
            sources += [p["image"] for p in parts if p.get("type") == "image"]
            if role == "system":
                pending.append(text)
            elif role == "user":
                question = "\n".join([*pending, text])
                pending = []
                if turns and not turns[-1][1]:
                    turns[-1][0] += "\n" + question
                else:
                    turns.append([question, ""])
            elif role == "assistant":
                if not turns:
                    turns.append(["", ""])
                turns[-1][1] = (turns[-1][1] + "\n" + text) if turns[-1][1] else text
            else:
                raise InputError(f"CogVLM's prompts have user and assistant turns, not a {role!r} message")
        if not turns or turns[-1][1]:
            raise InputError("the conversation must end with a user message: CogVLM answers the last question")
        if not add_generation_prompt:
            raise InputError(
                "CogVLM's templates always end with the answer prompt; add_generation_prompt=False is unsupported"
            )
        history = [(q, a) for q, a in turns[:-1]]
        return history, turns[-1][0], sources

    def _inputs(self, text: str, sources: list[Any], chat: bool) -> ModelInputs:
        if len(sources) > MAX_IMAGES:
            raise InputError(
                f"CogVLM takes one picture per conversation (this one has {len(sources)}); "
                "send each further picture in a conversation of its own"
            )
        images = [self.preprocess_image(source) for source in sources]
        text_ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if self.image_token_id in text_ids:
            token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            raise InputError(f"the prompt text contains {token!r}, which is reserved for CogVLM's picture; remove it")
        image_tokens = sum(image.num_tokens for image in images)
        token_ids = [self.bos_token_id] + [self.image_token_id] * image_tokens + text_ids
        inputs = ModelInputs(
            token_ids=token_ids, images=images, prompt=text, image_token_id=self.image_token_id, chat=chat
        )
        if not images:  # text-only: positions 0..T-1, as the engine gives by default
            return inputs
        import torch

        positions = torch.tensor(positions_of(len(token_ids), image_tokens), dtype=torch.long)
        inputs.positions = positions
        inputs.position_delta = int(positions[-1]) + 1 - len(token_ids)
        return inputs

    # -- pictures -----------------------------------------------------------------------------

    def preprocess_image(self, source: Any) -> ImageInput:
        image = load_image(source)
        pixels = image_pixels(image, self.settings.image_size)
        return ImageInput(
            pixel_values=pixels,
            num_tokens=self.settings.image_tokens,
            key=pixel_values_key(pixels),
            extra={"image_size": image.size},  # the original picture, which grounding boxes refer to
        )
