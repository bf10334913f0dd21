"""InternVL preprocessing: prompts and chat messages with images -> token ids and pixel tiles.

Two checkpoint layouts, one pipeline:

- Hugging Face layout (``model_type: "internvl"``): reproduces transformers' ``InternVLProcessor``
  with ``GotOcr2ImageProcessor`` (settings from ``preprocessor_config.json``, or the
  ``image_processor`` entry of ``processor_config.json``). The chat template writes
  ``<IMG_CONTEXT>`` where an image goes.
- original OpenGVLab layout (``InternVLChatModel``, ``model_type: "internvl_chat"``): reproduces
  OpenGVLab's ``load_image`` / ``dynamic_preprocess`` and the prompt ``model.chat`` builds
  (settings from config.json: ``force_image_size``, ``min/max_dynamic_patch``, ``use_thumbnail``,
  ``dynamic_image_size``; ImageNet mean/std; bicubic). Image parts are written ``<image>\\n``
  into the message text before the tokenizer's chat template renders it.

Each image becomes tiles (:func:`tile_image`): the grid of ``tile``-sized tiles whose aspect
ratio is closest to the image's (between ``min_tiles`` and ``max_tiles`` tiles; on a tie the
grid with more tiles wins while the image is bigger than half its area), the image resized to
that grid with PIL and cut up, plus a thumbnail of the whole image when there is more than one
tile. Pixels are rescaled in float64 and normalised in float32, exactly as transformers does
(through a 256-entry table per channel), so ``pixel_values`` are bit-identical to the reference
processor's. In the prompt every image
placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``,
tokens per tile = (tile / patch)^2 x downsample_ratio^2 (256 for 448-px tiles, patch 14, 0.5).

Image budget: tiles, not pixels. ``--max-num-tiles N`` (the engine's) and an image part's own
``max_num_tiles`` replace the checkpoint's ``max_patches`` / ``max_dynamic_patch``, as passing
``max_patches=N`` to transformers' processor (or ``max_num=N`` to OpenGVLab's ``load_image``)
does: an image costs at most N tiles, plus the thumbnail when it has more than one. A part may
ask for fewer tiles than the engine allows, never more. ``detail: "low"`` is one tile: the whole
picture resized to the tile size, no grid and no thumbnail (transformers' ``max_patches=1``, the
same as ``crop_to_patches=False``); ``high`` and ``auto`` are the engine's. A checkpoint that does
not tile (original layout, ``dynamic_image_size: false``) always makes one tile, whatever the
budget. InternVL's processors have no pixel budget: ``--min-pixels`` / ``--max-pixels`` and a
part's ``min_pixels`` / ``max_pixels`` are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlm.plugin import (
    ConfigError,
    ImageInput,
    ImagePromptPreprocessor,
    InputError,
    find_chat_template,
    iter_image_parts,
    normalize_messages,
    pixel_values_key,
    read_json,
    to_rgb,
)
from vlm_plugin_internvl.conversation import template_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # GotOcr2ImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
#: ``detail: "low"``: one tile (the whole picture at the tile size), as transformers' processor
#: makes it with ``max_patches=1`` or ``crop_to_patches=False``
LOW_DETAIL_TILES = 1
ORIGINAL_IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ImageSettings:
    """How images become tiles and pixel values."""

    tile_height: int
    tile_width: int
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    resample: int = BICUBIC
    rescale_factor: float | None = 1 / 255  # None: no rescaling
    mean: tuple[float, ...] | None = IMAGENET_MEAN  # None: no normalisation
    std: tuple[float, ...] | None = IMAGENET_STD

    @property
    def dynamic(self) -> bool:
        """Split into several tiles? (GotOcr2: ``crop_to_patches and max_patches > 1``)."""
        return self.max_tiles > 1


# ----------------------------------------------------------------------------- pixels


@lru_cache(maxsize=16)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # transformers' order (columns, then rows, ascending), without visiting grids over max_tiles:
    # a large --max-num-tiles stays cheap
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1) if min_tiles <= c * r]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))  # stable: by area, then columns


def closest_grid(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """``(columns, rows)`` of the tile grid whose aspect ratio is closest to the image's.

    transformers' ``get_optimal_tiled_canvas`` and OpenGVLab's ``find_closest_aspect_ratio``.
    """
    aspect_ratio = width / height
    tile_area = settings.tile_height * settings.tile_width
    best_diff, best = float("inf"), (1, 1)
    for columns, rows in _candidate_grids(settings.min_tiles, settings.max_tiles):
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and width * height > 0.5 * tile_area * columns * rows:
            best = (columns, rows)  # same ratio, more tiles: worth it for a big image
    return best


def tile_image(image: Any, settings: ImageSettings) -> tuple[list[Any], tuple[int, int]]:
    """Cut an RGB PIL image into tiles (+ thumbnail); returns the tiles and ``(columns, rows)``."""
    th, tw = settings.tile_height, settings.tile_width
    if not settings.dynamic:
        return [image.resize((tw, th), resample=settings.resample)], (1, 1)
    columns, rows = closest_grid(image.width, image.height, settings)
    resized = image.resize((tw * columns, th * rows), resample=settings.resample)
    tiles = [resized.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(columns)]
    if settings.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tw, th), resample=settings.resample))
    return tiles, (columns, rows)


def pixel_lookup_table(settings: ImageSettings) -> Any:
    """float32 ``[3, 256]``: the value each uint8 level of each channel becomes.

    Computed with transformers' arithmetic (``x * rescale`` in float64, cast to float32, then
    ``(x - mean) / std`` in float32), so looking values up gives exactly its results.
    """
    import numpy as np

    levels = np.arange(256, dtype=np.float64)
    values = (levels * settings.rescale_factor if settings.rescale_factor is not None else levels).astype(np.float32)
    table = np.repeat(values[None, :], 3, axis=0)
    if settings.mean is not None and settings.std is not None:
        mean = np.array(settings.mean, dtype=np.float32)[:, None]
        std = np.array(settings.std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table


def normalize_tiles(tiles: list[Any], settings: ImageSettings) -> Any:
    """uint8 RGB tiles -> float32 ``[n, 3, H, W]`` (rescaled and normalised)."""
    import numpy as np
    import torch

    pixels = np.stack([np.asarray(tile, dtype=np.uint8) for tile in tiles]).transpose(0, 3, 1, 2)  # [n, 3, H, W]
    table = pixel_lookup_table(settings)
    out = np.empty(pixels.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, channel], out=out[:, channel])
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- configs


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def is_original_layout(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "internvl_chat" or "InternVLChatModel" in (
        getattr(hf_config, "architectures", None) or []
    )


def hf_image_settings(model_path: str | Path) -> tuple[ImageSettings, dict[str, Any]]:
    """Settings of the Hugging Face layout's GotOcr2 image processor, and processor_config.json.

    ``crop_to_patches`` in the image processor's file is ignored: ``InternVLProcessor`` always
    passes ``crop_to_patches=True``.
    """
    model_path = Path(model_path)
    processor = read_json(model_path / "processor_config.json") or {}
    image = read_json(model_path / "preprocessor_config.json") or processor.get("image_processor")
    if image is None:
        raise ConfigError(
            f"{model_path} has no preprocessor_config.json (nor an image_processor entry in "
            "processor_config.json); copy it from the original model"
        )
    size = image.get("size", {"height": 384, "width": 384})
    if not isinstance(size, dict) or not size.get("height") or not size.get("width"):
        raise ConfigError(
            f"{model_path / 'preprocessor_config.json'}: 'size' must be {{'height': H, 'width': W}}, got {size!r}"
        )
    settings = ImageSettings(
        tile_height=int(size["height"]),
        tile_width=int(size["width"]),
        min_tiles=int(image.get("min_patches", 1)),
        max_tiles=int(image.get("max_patches", 12)),
        use_thumbnail=True,  # GotOcr2ImageProcessor.crop_image_to_patches' default, never overridden
        resample=int(image.get("resample", BICUBIC)),
        rescale_factor=float(image.get("rescale_factor", 1 / 255)) if image.get("do_rescale", True) else None,
        mean=tuple(image.get("image_mean", OPENAI_CLIP_MEAN)) if image.get("do_normalize", True) else None,
        std=tuple(image.get("image_std", OPENAI_CLIP_STD)) if image.get("do_normalize", True) else None,
    )
    return settings, processor


def original_image_settings(hf_config: Any) -> ImageSettings:
    """Settings of an original OpenGVLab checkpoint, from config.json (as vLLM reads them)."""
    size = getattr(hf_config, "force_image_size", None) or hf_config.vision_config.image_size
    height, width = _pair(size)
    dynamic = bool(getattr(hf_config, "dynamic_image_size", False))
    return ImageSettings(
        tile_height=height,
        tile_width=width,
        min_tiles=int(getattr(hf_config, "min_dynamic_patch", 1)) if dynamic else 1,
        max_tiles=int(getattr(hf_config, "max_dynamic_patch", 6)) if dynamic else 1,
        use_thumbnail=bool(getattr(hf_config, "use_thumbnail", False)),
        resample=BICUBIC,
    )


def tokens_per_tile(hf_config: Any, settings: ImageSettings) -> int:
    """(tile / patch)^2 * downsample_ratio^2: image tokens the model makes of one tile."""
    patch_h, patch_w = _pair(hf_config.vision_config.patch_size)
    ratio = float(getattr(hf_config, "downsample_ratio", 0.5))
    return int((settings.tile_height // patch_h) * (settings.tile_width // patch_w) * ratio**2)


# ----------------------------------------------------------------------------- preprocessor


class InternVLPreprocessor(ImagePromptPreprocessor):
    """Turns a prompt into :class:`vlm.inputs.ModelInputs` for an InternVL model.

    :param tokenizer: the model directory's transformers tokenizer.
    :param hf_config: ``InternVLConfig`` (Hugging Face layout) or ``vlm.config.RawConfig``
        (original layout).
    :param model_path: the model directory (preprocessor / processor configs, chat template).
    :param allowed_dir, allow_remote, max_pixels: image-loading policy, see
        :func:`vlm.inputs.images.load_image`.

    A prompt is a plain string (no images), token ids, or chat messages whose content may hold
    image parts (see :mod:`vlm.inputs`); :class:`vlm.inputs.preprocessor.ImagePromptPreprocessor` renders
    and expands it, this class makes the tiles and wraps each image's tokens in ``<img>`` ... ``</img>``.
    """

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        super().__init__(tokenizer, hf_config, model_path)
        self.original_layout = is_original_layout(hf_config)
        self.supports_images = getattr(hf_config, "vision_config", None) is not None
        if self.original_layout:
            # OpenGVLab: "<image>" in the text; the image tokens are plain added tokens
            self.start_token, self.end_token, self.image_token = IMG_START, IMG_END, IMG_CONTEXT
            self.placeholder = ORIGINAL_IMAGE_PLACEHOLDER
            self.chat_template = getattr(tokenizer, "chat_template", None)
            # model.chat renders with the conversation template config.json names, not the tokenizer's
            self.conversation = template_for(hf_config)
        else:
            # transformers: the tokenizer names its image tokens; the template writes the context token
            self.start_token = getattr(tokenizer, "start_image_token", None) or IMG_START
            self.end_token = getattr(tokenizer, "end_image_token", None) or IMG_END
            self.image_token = getattr(tokenizer, "context_image_token", None) or IMG_CONTEXT
            self.placeholder = self.image_token
        self.image_token_id = self.vocabulary_id(
            self.image_token,
            f"InternVL needs {IMG_START}, {IMG_END} and {IMG_CONTEXT} in its vocabulary",
            required=self.supports_images,
        )
        if self.supports_images:
            self.settings = self._image_settings()
            self.tokens_per_tile = tokens_per_tile(hf_config, self.settings)
            self._check_image_seq_length()
            # an original checkpoint trained without tiling keeps one tile whatever the budget
            self.tiles_images = not self.original_layout or bool(getattr(hf_config, "dynamic_image_size", False))
            self.low_detail_budget = type(self.image_budget)(max_num_tiles=LOW_DETAIL_TILES)

    def _image_settings(self) -> ImageSettings:
        if self.original_layout:
            return original_image_settings(self.hf_config)
        settings, self.processor_config = hf_image_settings(self.model_path)
        return settings

    def _check_image_seq_length(self) -> None:
        """processor_config.json must agree with what the model makes."""
        if self.original_layout:
            return
        declared = self.processor_config.get("image_seq_length")
        if declared is not None and int(declared) != self.tokens_per_tile:
            raise ConfigError(
                f"{self.model_path / 'processor_config.json'}: image_seq_length is {declared} but the "
                f"model makes {self.tokens_per_tile} tokens per {self.settings.tile_width}-px tile "
                "((tile / patch)^2 * downsample_ratio^2); fix one of them"
            )

    def budget_settings(self, budget: Any) -> ImageSettings:
        """The image settings within ``budget`` (a ``vlm.inputs.preprocessor.ImageBudget``): its
        ``max_num_tiles`` where set (pixel budgets do not apply to InternVL).

        :raises InputError: the budget asks for more tiles than the engine allows.
        """
        tiles = budget.max_num_tiles
        if tiles is None or not self.tiles_images:
            return self.settings
        ceiling = self.image_budget.max_num_tiles or self.settings.max_tiles
        if tiles > ceiling:
            raise InputError(
                f"an image asks for max_num_tiles {tiles}, but this engine allows at most {ceiling} tiles per image; "
                f"ask for {ceiling} or fewer (the engine's --max-num-tiles raises the limit)"
            )
        return self.settings if tiles == self.settings.max_tiles else replace(self.settings, max_tiles=tiles)

    def preprocess_image(self, source: Any) -> ImageInput:
        """Load one image (path, URL, bytes, PIL image) and make its tiles (the engine's budget)."""
        return self.preprocess_image_within(source, self.image_budget)

    def preprocess_image_within(self, source: Any, budget: Any) -> ImageInput:
        """:meth:`preprocess_image` with at most ``budget.max_num_tiles`` tiles (``detail``,
        ``--max-num-tiles``, a part's own ``max_num_tiles``)."""
        settings = self.budget_settings(budget)
        image = self.load_image(source)
        tiles, grid = tile_image(to_rgb(image), settings)
        pixel_values = normalize_tiles(tiles, settings)
        return ImageInput(
            pixel_values=pixel_values,
            num_tokens=len(tiles) * self.tokens_per_tile,
            key=pixel_values_key(pixel_values),
            extra={"grid": grid, "num_tiles": len(tiles), "image_size": image.size},
        )

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """OpenGVLab templates take string contents: an image is ``<image>\\n`` in the text."""
        if self.original_layout:
            for message in messages:
                if isinstance(message["content"], list):
                    parts = message["content"]
                    message["content"] = "".join(
                        p["text"] if p["type"] == "text" else self.placeholder + "\n" for p in parts
                    )
        return messages

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
        """The original layout renders as ``model.chat`` does, with config.json's conversation template."""
        conversation = getattr(self, "conversation", None)
        if conversation is None:
            return super().render(messages, add_generation_prompt)
        messages = normalize_messages(messages)
        sources = list(iter_image_parts(messages))
        if sources and not self.supports_images:
            raise InputError("this model takes no images (config.json has no vision_config); send text only")
        return conversation.render(self.prepare_messages(messages), add_generation_prompt), sources

    def expand_image(self, image: ImageInput) -> str:
        """``<img>`` + ``<IMG_CONTEXT>`` x the image's tokens + ``</img>``."""
        return self.start_token + self.image_token * image.num_tokens + self.end_token


__all__ = [
    "LOW_DETAIL_TILES",
    "ImageSettings",
    "InternVLPreprocessor",
    "closest_grid",
    "find_chat_template",
    "hf_image_settings",
    "normalize_tiles",
    "pixel_lookup_table",
    "original_image_settings",
    "tile_image",
    "to_rgb",
    "tokens_per_tile",
]
