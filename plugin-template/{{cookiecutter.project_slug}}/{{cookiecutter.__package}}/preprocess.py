{%- set C = cookiecutter.__class -%}
"""{{ C }} preprocessing: prompts and chat messages with images -> vlm.inputs.ModelInputs.

Chat messages are rendered with the tokenizer's chat template, which writes one ``<image>``
placeholder per image part. Each image is converted to RGB (transparency composited onto white),
resized to ``image_size x image_size`` and normalised to [-1, 1]; its placeholder is then
expanded to exactly as many ``<image>`` tokens as the model makes features of it
(``VisionSettings.tokens_per_image``), which the core replaces with those features.
"""

from __future__ import annotations

from typing import Any

from vlm.plugin import ConfigError, InputError
from vlm.plugin import load_image
from vlm.plugin import ImageInput, ModelInputs, Prompt, iter_image_parts, normalize_messages, pixel_values_key
from vlm.plugin import to_rgb  # transparency composited onto white, as transformers does

#: The placeholder token the chat template writes for an image, and the token its features replace.
IMAGE_TOKEN = "<image>"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


class {{ C }}Preprocessor:
    """Turns a prompt (string, token ids, or chat messages with image parts) into ModelInputs."""

    def __init__(self, tokenizer: Any, hf_config: Any):
        from {{ cookiecutter.__package }}.model import VisionSettings

        self.tokenizer = tokenizer
        self.settings = VisionSettings(hf_config)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no {IMAGE_TOKEN} token; add it as a special token")

    def preprocess_image(self, source: Any) -> ImageInput:
        """Load one image (path, URL, bytes, PIL image) -> pixel values ``[1, 3, S, S]``."""
        import numpy as np
        import torch

        size = self.settings.image_size
        image = to_rgb(load_image(source)).resize((size, size), resample=BICUBIC)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        pixel_values = torch.from_numpy((pixels - 0.5) / 0.5).unsqueeze(0)
        return ImageInput(
            pixel_values=pixel_values,
            num_tokens=self.settings.tokens_per_image,
            key=pixel_values_key(pixel_values),
        )

    def __call__(self, prompt: Prompt, add_generation_prompt: bool = True) -> ModelInputs:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if self.image_token_id in prompt:
                raise InputError("a token-id prompt cannot carry images; send chat messages with image parts")
            return ModelInputs(token_ids=list(prompt), image_token_id=self.image_token_id)
        if isinstance(prompt, list):
            messages = normalize_messages(prompt)
            sources = list(iter_image_parts(messages))
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            add_special_tokens = False  # the template wrote the special tokens the model wants
        elif isinstance(prompt, str):
            text, sources, add_special_tokens = prompt, [], True
        else:
            raise InputError(f"a prompt must be a string, a list of messages or token ids, not {type(prompt).__name__}")

        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(sources):
            raise InputError(
                f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) but {len(sources)} image(s); "
                f"send images as image parts and keep {IMAGE_TOKEN} out of the text"
            )
        images = [self.preprocess_image(source) for source in sources]
        # each placeholder becomes exactly as many tokens as the model makes features of the image
        expanded = pieces[0]
        for image, piece in zip(images, pieces[1:], strict=True):
            expanded += IMAGE_TOKEN * image.num_tokens + piece
        ids = list(self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        return ModelInputs(token_ids=ids, images=images, prompt=text, image_token_id=self.image_token_id)
