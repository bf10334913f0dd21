"""Prompt -> model inputs: everything between what a user sends and what the engine runs.

- :mod:`vlm.inputs.data`: :class:`ModelInputs` / :class:`ImageInput`, what a preprocessor returns.
- :mod:`vlm.inputs.messages`: OpenAI-style chat messages and the image parts in them.
- :mod:`vlm.inputs.images`: :func:`load_image` from paths, URLs, bytes or PIL images, with
  one-line errors.
- :mod:`vlm.inputs.preprocessor`: :class:`TextPreprocessor` and the base of VLM preprocessors,
  :class:`ImagePromptPreprocessor`, with the transformers image conventions they share.

Nothing here imports torch.
"""

from vlm.inputs.data import ImageInput, Message, ModelInputs, Preprocessor, Prompt, pixel_values_key
from vlm.inputs.images import MAX_PIXELS, image_content_key, load_image
from vlm.inputs.messages import has_image_parts, iter_image_parts, normalize_messages, validate_messages
from vlm.inputs.preprocessor import (
    ImagePromptPreprocessor,
    TextPreprocessor,
    find_chat_template,
    read_json,
    rescale_and_normalize,
    to_rgb,
)

__all__ = [
    "MAX_PIXELS",
    "ImageInput",
    "ImagePromptPreprocessor",
    "Message",
    "ModelInputs",
    "Preprocessor",
    "Prompt",
    "TextPreprocessor",
    "find_chat_template",
    "has_image_parts",
    "image_content_key",
    "iter_image_parts",
    "load_image",
    "normalize_messages",
    "pixel_values_key",
    "read_json",
    "rescale_and_normalize",
    "to_rgb",
    "validate_messages",
]
