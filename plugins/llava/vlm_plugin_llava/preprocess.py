"""LLaVA preprocessing: prompts and chat messages with images -> token ids and pixel values, as
transformers' ``LlavaProcessor`` / ``LlavaNextProcessor`` make them.

- Pixels come from transformers' own image processor for the checkpoint's
  ``preprocessor_config.json`` (``CLIPImageProcessor``, ``SiglipImageProcessor``,
  ``LlavaImageProcessor``, ``LlavaNextImageProcessor``), its PIL backend: that backend needs no
  torchvision, and using it keeps resizing, cropping, padding and anyres tiling equal to the
  reference by construction rather than by a second implementation to keep in step.
- Tokens: the chat template (the processor's ``chat_template.jinja`` / ``.json``, else the
  tokenizer's) writes ``<image>`` where each image goes; each one becomes
  ``num_tokens`` copies, counted as the processors count them:

  - LLaVA-1.5: ``(H // patch) * (W // patch) + num_additional_image_tokens``, minus one for
    ``vision_feature_select_strategy == "default"`` (``H x W``: the processed picture);
  - LLaVA-NeXT: the base tile's patches (+ additional tokens), plus the grid's patches cropped to
    the picture's aspect ratio, plus one newline per remaining row, minus one for "default"
    (:func:`anyres_num_tokens`).

  ``patch_size``, ``num_additional_image_tokens`` and ``vision_feature_select_strategy`` come from
  ``processor_config.json``; a checkpoint that leaves them out gets the model's own values (where
  transformers' processor would fail), and one whose values disagree with config.json is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vlm.plugin import ConfigError, ImageInput, ImagePromptPreprocessor, InputError, pixel_values_key, read_json

IMAGE_TOKEN = "<image>"  # LlavaProcessor's default
MAX_ASPECT_RATIO = 200  # as Qwen2-VL's smart_resize: beyond it, a picture is refused
_PROBE = "\x00vlm-probe\x00"


def anyres_num_tokens(
    original_size: tuple[int, int], tile: int, patch_size: int, grid_pinpoints: list, additional_tokens: int
) -> int:
    """Image tokens LLaVA-NeXT makes of a picture of ``(height, width)`` (before the "default"
    strategy's minus one): ``LlavaNextProcessor._get_number_of_features``, rounding included."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = original_size
    best_height, best_width = select_best_resolution((height, width), grid_pinpoints)
    patches = tile // patch_size
    current_height, current_width = patches * (best_height // tile), patches * (best_width // tile)
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= (current_height - new_height) // 2 * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= (current_width - new_width) // 2 * 2
    newlines = current_height
    return current_height * current_width + newlines + patches * patches + additional_tokens


class LlavaPreprocessor(ImagePromptPreprocessor):
    """Turns a prompt into :class:`vlm.inputs.ModelInputs` for a LLaVA-1.5 or LLaVA-NeXT model.

    :param tokenizer: the model directory's transformers tokenizer.
    :param hf_config: the ``LlavaConfig`` / ``LlavaNextConfig``.
    :param model_path: the model directory (preprocessor / processor configs, chat template).
    :param allowed_dir, allow_remote, max_pixels: image-loading policy, see
        :func:`vlm.inputs.images.load_image`.

    :class:`vlm.inputs.preprocessor.ImagePromptPreprocessor` renders and expands prompts; this class makes
    the pixels, counts each image's tokens and fits messages to the template's content style.
    """

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        super().__init__(tokenizer, hf_config, model_path)
        self.anyres = getattr(hf_config, "model_type", None) == "llava_next"
        self.processor_config = read_json(self.model_path / "processor_config.json") or {}
        self.image_token = getattr(tokenizer, "image_token", None) or self.processor_config.get(
            "image_token", IMAGE_TOKEN
        )
        self.placeholder = self.image_token
        self.image_token_id = self.vocabulary_id(self.image_token, "LLaVA needs it")
        self.image_processor = self._image_processor()
        self._settle_token_counts()
        self._template_reads_parts: bool | None = None

    # -- configuration

    def _image_processor(self) -> Any:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(self.model_path), backend="pil", local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"cannot build the image processor of {self.model_path} ({exc}); copy preprocessor_config.json "
                "from the original model"
            ) from None
        if self.anyres != (getattr(processor, "image_grid_pinpoints", None) is not None):
            raise ConfigError(
                f"{self.model_path}: preprocessor_config.json describes a {type(processor).__name__}, which does "
                f"not fit a {self.hf_config.model_type} model; copy the model's own preprocessor_config.json"
            )
        return processor

    def _settle_token_counts(self) -> None:
        """Take the processor's numbers (falling back to the model's) and check them against config.json."""
        from vlm_plugin_llava.model import VisionSettings

        vision = VisionSettings(self.hf_config)
        model_strategy = "default" if vision.drop_first else "full"
        declared = {
            "patch_size": (self.processor_config.get("patch_size"), vision.patch_size),
            "vision_feature_select_strategy": (
                self.processor_config.get("vision_feature_select_strategy"),
                model_strategy,
            ),
            "num_additional_image_tokens": (
                self.processor_config.get("num_additional_image_tokens"),
                int(vision.class_token),
            ),
        }
        for field, (value, model_value) in declared.items():
            if value is not None and value != model_value:
                raise ConfigError(
                    f"{self.model_path / 'processor_config.json'}: {field} is {value!r} but the model (config.json) "
                    f"makes image features for {model_value!r}; fix one of them"
                )
        self.patch_size = vision.patch_size
        self.drop_first = vision.drop_first
        self.additional_tokens = int(vision.class_token)
        # the processed picture (base tile) must be the tower's input size
        tile = self.image_processor(self._blank(), return_tensors="pt")["pixel_values"]
        if tuple(tile.shape[-2:]) != (vision.image_size, vision.image_size):
            raise ConfigError(
                f"{self.model_path / 'preprocessor_config.json'} makes {tile.shape[-2]}x{tile.shape[-1]} pictures but "
                f"the vision tower takes {vision.image_size}x{vision.image_size}; fix size / crop_size"
            )
        self.tile_size = vision.image_size
        if self.anyres:
            pinpoints = [list(p) for p in self.image_processor.image_grid_pinpoints]
            if pinpoints != [list(p) for p in self.hf_config.image_grid_pinpoints]:
                raise ConfigError(
                    f"{self.model_path}: image_grid_pinpoints differ between preprocessor_config.json and "
                    "config.json; they must be the same list"
                )

    @staticmethod
    def _blank() -> Any:
        from PIL import Image

        return Image.new("RGB", (8, 8))

    # -- images

    def num_tokens(self, pixel_values: Any, original_size: tuple[int, int]) -> int:
        if self.anyres:
            count = anyres_num_tokens(
                original_size,
                self.tile_size,
                self.patch_size,
                self.image_processor.image_grid_pinpoints,
                self.additional_tokens,
            )
        else:
            height, width = pixel_values.shape[-2:]
            count = (height // self.patch_size) * (width // self.patch_size) + self.additional_tokens
        return count - int(self.drop_first)

    def preprocess_image(self, source: Any) -> ImageInput:
        """Load one image (path, URL, bytes, PIL image) and process it as the reference processor does."""
        image = self.load_image(source)
        if not self.anyres and max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            # CLIP's processor scales the *short* side to the crop size before cropping: a 60000x1
            # picture of a few bytes would become a multi-GB intermediate
            raise InputError(
                f"a {image.width}x{image.height} picture has an aspect ratio above {MAX_ASPECT_RATIO}:1, which "
                "this model's preprocessing would blow up to a huge intermediate image; crop or pad it first"
            )
        out = self.image_processor([image], return_tensors="pt")
        pixel_values = out["pixel_values"][0]  # LLaVA: [3, S, S]; NeXT: [1 + tiles, 3, S, S]
        if not self.anyres:
            pixel_values = pixel_values[None]
        original_size = (image.height, image.width)
        key = pixel_values_key(pixel_values)
        if self.anyres:  # the token count also depends on the original size, not only on the pixels
            key = hashlib.sha256(f"{key}:{original_size}".encode()).hexdigest()
        return ImageInput(
            pixel_values=pixel_values,
            num_tokens=self.num_tokens(pixel_values, original_size),
            key=key,
            extra={"original_size": original_size},
        )

    # -- prompts

    def _reads_parts(self) -> bool:
        """Does the chat template read list contents ({"type": "text", ...} parts), as llava-hf's do?"""
        if self._template_reads_parts is None:
            probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
            try:
                rendered = self.tokenizer.apply_chat_template(probe, chat_template=self.chat_template, tokenize=False)
            except Exception:  # noqa: BLE001 - a template that fails on parts reads strings
                rendered = ""
            self._template_reads_parts = _PROBE in rendered
        return self._template_reads_parts

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Contents as the template reads them: parts for llava-hf's templates, else a string."""
        for message in messages:
            content = message["content"]
            if self._reads_parts():
                # llava-hf templates iterate over parts: a string content would render as nothing
                if isinstance(content, str):
                    message["content"] = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                # a string-only template: images first, as llava-hf's templates write them
                images = "".join(self.image_token + "\n" for p in content if p["type"] == "image")
                message["content"] = images + "".join(p["text"] for p in content if p["type"] == "text")
        return messages


__all__ = ["LlavaPreprocessor", "anyres_num_tokens"]
