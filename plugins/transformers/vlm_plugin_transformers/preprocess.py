"""Prompts with images -> model inputs, made by the model's own transformers processor.

The chat template writes the processor's placeholder once per image (``<image>`` for Idefics3,
``<start_of_image>`` for Gemma 3, ...); the processor itself expands it and tokenizes, so the
token ids are the processor's by construction. Pixels come from its PIL image processor (no
torchvision). Each image is also run through the processor alone, for its own pixel tensors and
placeholder count (the batched tensors of a multi-image prompt are laid out per family): images are
therefore processed twice, the price of staying generic.

Family-specific metadata the engine needs, from the processor's own outputs:

- bidirectional spans (``ModelInputs.bidirectional_spans``): Gemma 3 attends bidirectionally within
  each run of image tokens, PaliGemma within its prefix (the whole prompt: ``token_type_ids`` 0);
- explicit positions: PaliGemma counts positions from 1; Qwen2-VL's multimodal rope positions
  (``[3, T]`` and a ``position_delta``) come from the model class's own ``get_rope_index``.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from vlm.plugin import ConfigError, ImageInput, ImagePromptPreprocessor, InputError, ModelInputs, pixel_values_key
from vlm_plugin_transformers.families import image_refusal, model_class_name

#: processor outputs that are about text, not one image
TEXT_KEYS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "labels",
    "text_replacement_offsets",
}
#: families whose image tokens attend to each other bidirectionally (transformers' blockwise masks)
IMAGE_RUN_SPANS = {"gemma3"}
#: families whose prefix (token_type_ids == 0: the whole prompt at inference) is bidirectional
PREFIX_SPANS = {"paligemma"}
#: families whose positions count from 1 (PaliGemma: ``position_ids + 1`` in transformers)
ONE_BASED_POSITIONS = {"paligemma"}


def load_processor(model_path: Path, tokenizer: Any, model_type: str | None = None) -> Any:
    """The checkpoint's transformers processor with its PIL image processor (no torchvision) and
    without a video processor (which needs torchvision, and vlm sends no videos). The processor
    class is the one the checkpoint names, else the one ``AutoProcessor`` has for ``model_type``."""
    import transformers
    from transformers import AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from vlm.plugin import find_chat_template, read_json

    try:
        image_processor = AutoImageProcessor.from_pretrained(str(model_path), backend="pil", local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ConfigError(
            f"cannot build the image processor of {model_path} ({exc}); copy preprocessor_config.json from the "
            "original model"
        ) from None
    settings = read_json(model_path / "processor_config.json") or {}
    name = settings.pop("processor_class", None) or getattr(image_processor, "processor_class", None)
    if not name:
        name = (read_json(model_path / "preprocessor_config.json") or {}).get("processor_class")
    if not name and model_type is not None:
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_class = getattr(transformers, str(name), None) if name else None
    if processor_class is None:
        raise ConfigError(
            f"{model_path}: no processor_class in processor_config.json or preprocessor_config.json, and transformers "
            f"has no processor for model type {model_type!r}; copy those files from the original model"
        )
    accepted = inspect.signature(processor_class.__init__).parameters
    # (transformers 5 nests the sub-processors' settings here: those are built above, not passed)
    kwargs = {
        k: v
        for k, v in settings.items()
        if k in accepted and k not in ("image_processor", "tokenizer", "video_processor", "feature_extractor")
    }
    if "video_processor" in accepted:
        processor_class = without_video_processor(processor_class)
    if "chat_template" in accepted:
        kwargs["chat_template"] = find_chat_template(model_path, tokenizer)
    try:
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"cannot build {name} for {model_path} ({exc}); check processor_config.json") from None


@cache
def without_video_processor(processor_class: Any) -> Any:
    """``processor_class`` without its video processor (vlm sends no videos, and transformers'
    video processors need torchvision).

    Passing ``video_processor=None`` alone is not enough: transformers checks every sub-processor
    its ``__init__`` names against that sub-processor's base class, which without torchvision it
    cannot even look up. transformers reads the sub-processors from the ``__init__`` signature, so
    a subclass whose ``__init__`` does not name ``video_processor`` has none.
    """

    class Videoless(processor_class):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)

    Videoless.__name__ = Videoless.__qualname__ = processor_class.__name__
    Videoless.__doc__ = processor_class.__doc__
    return Videoless


def image_runs(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of ``image_token_id`` (transformers' image groups)."""
    runs: list[tuple[int, int]] = []
    start = None
    for index, token in enumerate([*token_ids, None]):
        if token == image_token_id and start is None:
            start = index
        elif token != image_token_id and start is not None:
            runs.append((start, index))
            start = None
    return runs


class ProcessorPreprocessor(ImagePromptPreprocessor):
    """:class:`vlm.inputs.ImagePromptPreprocessor` over a transformers processor.

    :param tokenizer: the model directory's tokenizer; :param hf_config: the model's config;
    :param model_path: the model directory.
    """

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        super().__init__(tokenizer, hf_config, model_path)
        self.model_type = getattr(hf_config, "model_type", None)
        self.processor = load_processor(self.model_path, tokenizer, self.model_type)
        self.placeholder = self.processor.image_token  # what the processor expands, once per image
        self.image_token = self.placeholder
        config_id = getattr(hf_config, "image_token_id", None)
        if config_id is None:
            config_id = getattr(hf_config, "image_token_index", None)
        self.image_token_id = config_id if config_id is not None else self.processor.image_token_id
        self.image_refusal = image_refusal(hf_config)
        self.rope_index = _rope_index(hf_config)

    # -- images

    def _process(self, text: str, images: list[Any], add_special_tokens: bool) -> Any:
        try:
            return self.processor(
                text=[text],
                images=images or None,
                return_tensors="pt",
                add_special_tokens=add_special_tokens,
            )
        except ValueError as exc:  # the processor's own checks (placeholder counts, sizes)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"the model's processor refused the prompt: {first}") from None

    def preprocess_image(self, source: Any) -> ImageInput:
        """One picture through the processor alone: its pixel tensors and placeholder count."""
        image = self.load_image(source)
        out = self._process(self.placeholder, [image], add_special_tokens=False)
        tensors = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
        pixel_values = tensors.pop("pixel_values")
        num_tokens = int((out["input_ids"][0] == self.image_token_id).sum())
        digest = hashlib.sha256(pixel_values_key(pixel_values).encode())
        for name in sorted(tensors):
            digest.update(f"{name}:{pixel_values_key(tensors[name])}".encode())
        return ImageInput(
            pixel_values=pixel_values,
            num_tokens=num_tokens,
            key=digest.hexdigest(),
            extra={**tensors, "image_size": (image.width, image.height)},
        )

    # -- prompts

    @property
    def raw_image_text(self) -> str:
        # PaliGemma's processor places images (and BOS) itself before a prompt without placeholders
        return "" if self.model_type in PREFIX_SPANS else super().raw_image_text

    def _expand(
        self,
        text: str,
        sources: list[Any],
        add_special_tokens: bool,
        templated: bool = False,
        options: list[dict[str, Any]] | None = None,
    ) -> ModelInputs:
        """The processor expands and tokenizes (image budget options do not apply: the processor's
        own configuration sizes the pictures)."""
        if sources and self.image_refusal:
            raise InputError(self.image_refusal)
        if self.placeholder in text and not sources and self.model_type not in PREFIX_SPANS:
            raise InputError(f"the prompt text contains {self.placeholder!r}, which is reserved for images; remove it")
        pictures = [self.load_image(source) for source in sources]
        images = [self.preprocess_image(picture) for picture in pictures]
        if self.model_type in PREFIX_SPANS and not pictures:
            raise InputError(f"{self.model_type} needs an image with every prompt (its processor refuses text alone)")
        out = self._process(text, pictures, add_special_tokens)
        ids = out["input_ids"][0].tolist()
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        if ids.count(self.image_token_id) != sum(image.num_tokens for image in images):
            raise InputError(f"the prompt text contains {self.placeholder!r}, which is reserved for images; remove it")
        inputs = ModelInputs(token_ids=ids, images=images, prompt=text, image_token_id=self.image_token_id)
        return self.finish(self._metadata(inputs, out))

    def _metadata(self, inputs: ModelInputs, out: Any) -> ModelInputs:
        """Spans and positions the family's transformers code derives from the processor's outputs."""
        ids = inputs.token_ids
        if self.model_type in IMAGE_RUN_SPANS and self.image_token_id is not None:
            inputs.bidirectional_spans = image_runs(ids, self.image_token_id) or None
        if self.model_type in PREFIX_SPANS:
            types_ = out.get("token_type_ids")
            prefix = int((types_[0] == 0).sum()) if types_ is not None else len(ids)
            inputs.bidirectional_spans = [(0, prefix)] if prefix > 1 else None
        if self.model_type in ONE_BASED_POSITIONS:
            inputs.positions = torch.arange(1, len(ids) + 1)
            inputs.position_delta = 1
        if self.rope_index is not None:
            inputs.positions, inputs.position_delta = self.rope_index(ids, inputs.images, self.image_token_id)
        return inputs

    def __call__(self, prompt: Any, add_generation_prompt: bool = True, tools: Any = None) -> ModelInputs:
        inputs = super().__call__(prompt, add_generation_prompt, tools)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):  # token ids: metadata from them
            return self._metadata(inputs, {})
        return inputs

    def raw_prompt(self, text: str, images: Sequence[Any] = ()) -> ModelInputs:
        return super().raw_prompt(text, images)


def _rope_index(hf_config: Any) -> Any:
    """Multimodal rope positions with the model class's own ``get_rope_index`` (Qwen2-VL), run on
    a stand-in that holds only the config (no model is built for preprocessing); None for 1-D rope."""
    import transformers

    name = model_class_name(hf_config)
    model_class = getattr(transformers, name or "", None)
    base_name = (name or "").replace("ForConditionalGeneration", "Model")
    base_class = getattr(transformers, base_name, None)
    get_rope_index = getattr(base_class, "get_rope_index", None) if model_class is not None else None
    if get_rope_index is None:
        return None
    stand_in = types.SimpleNamespace(config=hf_config)
    for attr in ("get_vision_position_ids",):
        method = getattr(base_class, attr, None)
        if method is not None:
            setattr(stand_in, attr, types.MethodType(method, stand_in))

    def rope_index(token_ids: list[int], images: list[ImageInput], image_token_id: int) -> tuple[torch.Tensor, int]:
        input_ids = torch.tensor([token_ids])
        token_types = (input_ids == image_token_id).int()
        grids = [image.extra["image_grid_thw"] for image in images if "image_grid_thw" in image.extra]
        grid = torch.cat(grids) if grids else None
        if grid is None:  # text only: plain positions in all three rows
            return torch.arange(len(token_ids)).expand(3, -1).clone(), 0
        positions, deltas = get_rope_index(stand_in, input_ids, token_types, image_grid_thw=grid)
        return positions[:, 0], int(deltas.flatten()[0])

    return rope_index


__all__ = ["ProcessorPreprocessor", "image_runs", "load_processor"]
