"""Qwen2-VL / Qwen2.5-VL preprocessing: prompts and chat messages with images -> token ids,
flattened patches and M-RoPE positions.

Reproduces transformers' ``Qwen2VLProcessor`` (and ``Qwen2_5_VLProcessor``, the same for images)
with ``Qwen2VLImageProcessorPil``, settings from the model directory's
``preprocessor_config.json``:

- **dynamic resolution**: :func:`smart_resize` picks the size closest to the picture's whose
  sides are multiples of ``patch_size * merge_size`` (28 px) and whose area lies within
  ``[min_pixels, max_pixels]``; the picture is resized to it with PIL (bicubic), so a picture
  becomes ``(h / 14) x (w / 14)`` patches, each merged 2 x 2 into one token by the model.
- **pixels**: rescaled and normalised with transformers' arithmetic, then flattened into
  ``[num_patches, C * temporal_patch_size * patch_size^2]`` rows in the vision tower's merge
  order (each 2 x 2 block of patches consecutive), a picture repeated over the temporal patch
  as transformers does for images. ``ImageInput.extra["image_grid_thw"]`` is ``(1, h, w)`` in
  patches.
- **prompt**: the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image;
  each ``<|image_pad|>`` is expanded to ``h * w / merge_size^2`` copies.
- **positions**: M-RoPE positions as transformers' ``get_rope_index`` computes them (text tokens
  count up in all three rows; an image's tokens take ``start + (t, row, column)`` and the text
  after it continues at ``start + max(rows, columns)``), and ``position_delta`` for generated
  tokens. Prompts without images leave both to the engine (``0..T-1``).

Videos are not supported: a ``video`` part is refused by the core's message validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.plugin import (
    ConfigError,
    ImageInput,
    ImagePromptPreprocessor,
    InputError,
    ModelInputs,
    pixel_values_key,
    read_json,
    rescale_and_normalize,
    to_rgb,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2VLImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
MAX_ASPECT_RATIO = 200  # smart_resize refuses more elongated pictures

IMAGE_PAD = "<|image_pad|>"
#: ``detail: "low"``: at most this many pixels, so at most 64 image tokens (28 x 28 pixels each;
#: OpenAI's low detail costs 85), whatever the engine's budget
LOW_DETAIL_MAX_PIXELS = 64 * 28 * 28


@dataclass(frozen=True)
class ImageSettings:
    """How pictures become patches (the fields of ``Qwen2VLImageProcessor``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = BICUBIC
    do_resize: bool = True
    rescale_factor: float | None = 1 / 255  # None: no rescaling
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # None: no normalisation
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        """Sides are multiples of this: one merged token covers ``factor x factor`` pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(cls, model_path: str | Path) -> ImageSettings:
        """Read ``preprocessor_config.json`` (or the ``image_processor`` entry of processor_config.json).

        Pixel budgets: ``size: {shortest_edge, longest_edge}`` (transformers 5), overridden by
        top-level ``min_pixels`` / ``max_pixels`` (the original Qwen files), as transformers does.
        """
        model_path = Path(model_path)
        data = read_json(model_path / "preprocessor_config.json")
        if data is None:
            data = (read_json(model_path / "processor_config.json") or {}).get("image_processor")
        if data is None:
            raise ConfigError(
                f"{model_path} has no preprocessor_config.json; copy it from the original model "
                "(it holds min_pixels, max_pixels, patch_size and merge_size)"
            )
        size = data.get("size") or {}
        min_pixels = data.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or cls.min_pixels
        max_pixels = data.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or cls.max_pixels
        if not 0 < int(min_pixels) <= int(max_pixels):
            raise ConfigError(
                f"{model_path / 'preprocessor_config.json'}: min_pixels ({min_pixels}) must be positive and at most "
                f"max_pixels ({max_pixels})"
            )
        normalize = data.get("do_normalize", True)
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(data.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(data.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(data.get("merge_size", cls.merge_size)),
            resample=int(data.get("resample", BICUBIC)),
            do_resize=bool(data.get("do_resize", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else None,
            mean=tuple(data.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(data.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
        )


# ----------------------------------------------------------------------------- pixels


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` to resize to: multiples of ``factor``, area within the budget, aspect
    ratio kept as closely as possible (transformers' and Qwen's ``smart_resize``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"a {width}x{height} picture has an aspect ratio above {MAX_ASPECT_RATIO}:1, which Qwen2-VL "
            "cannot take; crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: Any, settings: ImageSettings) -> Any:
    """float32 ``[C, H, W]`` -> ``[(H / P) * (W / P), C * T * P * P]`` rows, each ``merge x merge``
    block of patches consecutive; the single picture fills all ``T`` temporal slots."""

    channels, height, width = pixels.shape
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (rows/m, cols/m, m, m, C, P, P)
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
    return patches.reshape(grid_h * grid_w, channels * t * p * p).contiguous()


def preprocess_pixels(image: Any, settings: ImageSettings) -> tuple[Any, tuple[int, int, int]]:
    """An RGB PIL image -> flattened patches and ``(t, h, w)`` in patches."""
    import numpy as np
    import torch

    height, width = image.height, image.width
    if settings.do_resize:
        height, width = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
        image = image.resize((width, height), resample=settings.resample)
    elif height % settings.factor or width % settings.factor:
        raise InputError(
            f"a {width}x{height} picture cannot be cut into {settings.factor}-px blocks without resizing, "
            "and preprocessor_config.json says do_resize: false; resize it to multiples of "
            f"{settings.factor} px"
        )
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
    values = rescale_and_normalize(pixels, settings.rescale_factor, settings.mean, settings.std)
    patches = patchify(torch.from_numpy(np.ascontiguousarray(values)), settings)
    return patches, (1, height // settings.patch_size, width // settings.patch_size)


# ----------------------------------------------------------------------------- positions


def mrope_positions(
    token_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge_size: int
) -> tuple[Any, int]:
    """M-RoPE positions ``[3, T]`` of a prompt and the delta of the tokens generated after it.

    The i-th run of image tokens belongs to the i-th grid ``(t, h, w)`` (in patches); text before,
    between and after counts up by one per token in all three rows, as in transformers'
    ``Qwen2VLModel.get_rope_index``.
    """
    import torch

    pieces = []
    position = index = 0
    for t, h, w in grids:
        rows, cols = h // merge_size, w // merge_size
        start = token_ids.index(image_token_id, index)
        pieces.append(torch.arange(start - index).expand(3, -1) + position)
        position += start - index
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + position)
        position += max(rows, cols)  # the text after an image starts past its largest side
        index = start + t * rows * cols
    pieces.append(torch.arange(len(token_ids) - index).expand(3, -1) + position)
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - len(token_ids)


# ----------------------------------------------------------------------------- preprocessor


class Qwen2VLPreprocessor(ImagePromptPreprocessor):
    """Turns a prompt into :class:`vlm.inputs.ModelInputs` for a Qwen2-VL / Qwen2.5-VL model.

    :param tokenizer: the model directory's transformers tokenizer.
    :param hf_config: the model's ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``.
    :param model_path: the model directory (preprocessor_config.json, chat template).
    :param allowed_dir, allow_remote, max_pixels: image-loading policy, see
        :func:`vlm.inputs.images.load_image`.

    A prompt is a plain string (no images), token ids, or chat messages whose content may hold
    image parts (see :mod:`vlm.inputs`); :class:`vlm.inputs.preprocessor.ImagePromptPreprocessor` renders
    and expands it, this class makes the pixels and the positions.
    """

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        super().__init__(tokenizer, hf_config, model_path)
        self.settings = ImageSettings.from_model_dir(self.model_path)
        # detail "low": at most LOW_DETAIL_MAX_PIXELS, and never more than the model's own budget
        self.low_detail_budget = type(self.image_budget)(
            max_pixels=min(LOW_DETAIL_MAX_PIXELS, self.settings.max_pixels)
        )
        # the processor's rule: the tokenizer may name its image token, else <|image_pad|>
        self.image_token = self.placeholder = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.image_token_id = self.vocabulary_id(
            self.image_token, "Qwen2-VL needs <|vision_start|>, <|image_pad|> and <|vision_end|> in its vocabulary"
        )
        self._check_vision_config()

    @property
    def raw_image_text(self) -> str:
        """An image in a raw prompt as the base checkpoints' template writes it (no newline)."""
        return "<|vision_start|>" + self.placeholder + "<|vision_end|>"

    def _check_vision_config(self) -> None:
        """preprocessor_config.json must cut patches the way the vision tower reads them."""
        vision = self.hf_config.vision_config
        s = self.settings
        for field, ours in (
            ("patch_size", s.patch_size),
            ("temporal_patch_size", s.temporal_patch_size),
            ("spatial_merge_size", s.merge_size),
        ):
            theirs = getattr(vision, field, None)
            if theirs is not None and int(theirs) != ours:
                raise ConfigError(
                    f"{self.model_path / 'preprocessor_config.json'} cuts pictures with {field} {ours} but "
                    f"config.json's vision_config says {theirs}; fix one of them"
                )

    def budget_settings(self, budget: Any) -> ImageSettings:
        """preprocessor_config.json's settings within ``budget`` (a ``vlm.inputs.preprocessor.ImageBudget``:
        its ``min_pixels`` / ``max_pixels`` where set, as transformers' processor takes them)."""
        min_pixels = budget.min_pixels if budget.min_pixels is not None else self.settings.min_pixels
        max_pixels = budget.max_pixels if budget.max_pixels is not None else self.settings.max_pixels
        if min_pixels > max_pixels:
            if budget.min_pixels is not None:
                raise InputError(f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels}); lower or raise one")
            min_pixels = max_pixels  # a budget below the model's minimum: the budget wins
        if (min_pixels, max_pixels) == (self.settings.min_pixels, self.settings.max_pixels):
            return self.settings
        return dataclasses.replace(self.settings, min_pixels=min_pixels, max_pixels=max_pixels)

    def preprocess_image(self, source: Any) -> ImageInput:
        """Load one picture (path, URL, bytes, PIL image) and make its patches (the engine's budget)."""
        return self.preprocess_image_within(source, self.image_budget)

    def preprocess_image_within(self, source: Any, budget: Any) -> ImageInput:
        """:meth:`preprocess_image`, resized into ``budget`` (``detail``, ``--max-pixels``, a part's own)."""
        image = self.load_image(source)
        patches, grid = preprocess_pixels(to_rgb(image), self.budget_settings(budget))
        # the grid is part of the key: a flat-coloured picture and its transpose have equal
        # patches but different rotary positions, hence different features
        key = hashlib.sha256(f"{pixel_values_key(patches)}:{grid}".encode()).hexdigest()
        return ImageInput(
            pixel_values=patches,
            num_tokens=patches.shape[0] // self.settings.merge_size**2,
            key=key,
            # Qwen2.5-VL answers grounding questions in pixels of the resized picture
            extra={
                "image_grid_thw": grid,
                "image_size": image.size,
                "resized_size": (grid[2] * self.settings.patch_size, grid[1] * self.settings.patch_size),
            },
        )

    def finish(self, inputs: ModelInputs) -> ModelInputs:
        """Prompts with pictures get their M-RoPE positions; others count 0..T-1 (the engine's default)."""
        if not inputs.images:
            return inputs
        grids = [image.extra["image_grid_thw"] for image in inputs.images]
        assert self.image_token_id is not None  # set when the preprocessor was built
        positions, delta = mrope_positions(inputs.token_ids, self.image_token_id, grids, self.settings.merge_size)
        return dataclasses.replace(inputs, positions=positions, position_delta=delta)


__all__ = [
    "LOW_DETAIL_MAX_PIXELS",
    "ImageSettings",
    "Qwen2VLPreprocessor",
    "mrope_positions",
    "patchify",
    "preprocess_pixels",
    "smart_resize",
]
