"""Qwen2-VL / Qwen2.5-VL preprocessing: prompts and chat messages with images and videos -> token
ids, flattened patches and M-RoPE positions.

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
- **videos** (``video`` / ``video_url`` parts: a file decoded with PyAV, or a list of frames):
  frames sampled and cut into temporal patches as transformers' ``Qwen2VLVideoProcessor`` does
  (see ``video.py``); the template writes ``<|vision_start|><|video_pad|><|vision_end|>`` per
  video, each ``<|video_pad|>`` expanded to ``t * h * w / merge_size^2`` copies. A video is an
  :class:`~vlm.plugin.ImageInput` whose ``placeholder_token_id`` is ``<|video_pad|>``'s, listed
  with the pictures in prompt order.
- **positions**: M-RoPE positions as transformers' ``get_rope_index`` computes them (text tokens
  count up in all three rows; a picture's or video's tokens take ``start + (t, row, column)``,
  Qwen2.5-VL's video ``t`` scaled by ``tokens_per_second * second_per_grid_t`` and truncated, and
  the text after it continues at ``start + max(rows, columns)``: transformers 5 does not count the
  temporal extent there), and ``position_delta`` for generated tokens. Prompts without pictures
  leave both to the engine (``0..T-1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from vlm.plugin import (
    ConfigError,
    ImageInput,
    ImagePromptPreprocessor,
    InputError,
    ModelInputs,
    check_text,
    has_video_parts,
    iter_media_parts,
    load_frames,
    normalize_messages,
    open_video,
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
VIDEO_PAD = "<|video_pad|>"
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
    """M-RoPE positions ``[3, T]`` of a prompt with pictures only (:func:`mrope_positions_of`)."""
    return mrope_positions_of(token_ids, [(image_token_id, grid, 1) for grid in grids], merge_size)


def mrope_positions_of(
    token_ids: list[int], items: list[tuple[int, tuple[int, int, int], Any]], merge_size: int
) -> tuple[Any, int]:
    """M-RoPE positions ``[3, T]`` of a prompt and the delta of the tokens generated after it.

    ``items`` are the prompt's pictures and videos in order, each ``(placeholder token id, grid
    (t, h, w) in patches, temporal interval)``: the i-th item fills the next run of its placeholder,
    its temporal positions are ``arange(t) * interval`` truncated (1 for pictures and Qwen2-VL;
    Qwen2.5-VL's videos: ``tokens_per_second * second_per_grid_t`` as a float32 tensor). Text
    before, between and after counts up by one per token in all three rows, as in transformers'
    ``get_rope_index``.
    """
    import torch

    pieces = []
    position = index = 0
    for token_id, (t, h, w), interval in items:
        rows, cols = h // merge_size, w // merge_size
        start = token_ids.index(token_id, index)
        pieces.append(torch.arange(start - index).expand(3, -1) + position)
        position += start - index
        temporal = (torch.arange(t) * interval).long()
        grid = torch.stack(torch.meshgrid(temporal, torch.arange(rows), torch.arange(cols), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + position)
        position += max(rows, cols)  # the text after a picture starts past its largest side
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

    supports_video = True

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
        # videos: the processor's rule for the token too; a tokenizer without it takes no video
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.video_token_id = self.vocabulary_id(self.video_token, "", required=False)
        config_video_id = getattr(hf_config, "video_token_id", None)
        if self.video_token_id is not None and config_video_id is not None and config_video_id != self.video_token_id:
            raise ConfigError(
                f"config.json video_token_id is {config_video_id} but the tokenizer's {self.video_token} is "
                f"{self.video_token_id}; the tokenizer does not belong to this model"
            )
        # Qwen2.5-VL spaces a video's temporal positions by its frame rate; Qwen2-VL does not
        vision = hf_config.vision_config
        self.tokens_per_second = (
            getattr(vision, "tokens_per_second", None)
            if getattr(hf_config, "model_type", None) == "qwen2_5_vl"
            else None
        )
        text_config = getattr(hf_config, "text_config", None) or hf_config
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self._check_vision_config()

    @cached_property
    def video_settings(self) -> Any:
        """The video processor's settings (``video.VideoSettings``), read when the first video comes."""
        from .video import VideoSettings

        return VideoSettings.from_model_dir(self.model_path)

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

    @property
    def model_max_pixels(self) -> int:  # type: ignore[override]
        return self.settings.max_pixels

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

    # -- videos -------------------------------------------------------------------------------

    def __call__(
        self, prompt: Any, add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> ModelInputs:
        if isinstance(prompt, list) and self.video_token_id is not None and self.video_token_id in prompt:
            raise InputError(
                f"a token-id prompt cannot carry videos (it holds {self.video_token} tokens); send chat messages "
                "with video parts instead"
            )
        if not has_video_parts(prompt):
            return super().__call__(prompt, add_generation_prompt, tools)
        return self.with_videos(prompt, add_generation_prompt, tools)

    def with_videos(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None
    ) -> ModelInputs:
        """Chat messages with video (and picture) parts: render, preprocess every picture and video
        in prompt order, expand each placeholder to its item's tokens, tokenize."""
        if self.video_token_id is None:
            raise InputError(
                f"this checkpoint's tokenizer has no {self.video_token} token, so the model takes no video; send "
                "the frames as images"
            )
        messages = normalize_messages(messages, videos=True)
        media = list(iter_media_parts(messages))
        text, _ = self.render_with_tools(messages, add_generation_prompt, tools)
        # the template writes one placeholder per picture and per video, in order
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text)
        written = ["video" if piece == self.video_token else "image" for piece in pieces[1::2]]
        if written != [kind for kind, _, _ in media]:
            shown = " ".join((self.chat_template or "").split())[:60]
            raise InputError(
                f"the chat template ({shown!r}...) wrote placeholders for {_count(written)} but the messages hold "
                f"{_count([kind for kind, _, _ in media])}; use a template that places pictures and videos"
            )
        items = [
            self.preprocess_video(source, options)
            if kind == "video"
            else self.preprocess_image_within(source, self.budget_for(options))
            for kind, source, options in media
        ]
        expanded = [pieces[0]]
        for item, piece in zip(items, pieces[2::2]):
            token = self.image_token if item.placeholder_token_id is None else self.video_token
            expanded += [token * item.num_tokens, piece]
        bos = getattr(self.tokenizer, "bos_token", None)
        ids = list(
            self.tokenizer(check_text("".join(expanded)), add_special_tokens=not (bos and text.startswith(bos)))[
                "input_ids"
            ]
        )
        for token, token_id, kind in (
            (self.image_token, self.image_token_id, "image"),
            (self.video_token, self.video_token_id, "video"),
        ):
            wanted = sum(item.num_tokens for item, (k, _, _) in zip(items, media) if k == kind)
            if ids.count(token_id) != wanted:
                raise InputError(f"the prompt text contains {token!r}, which is reserved for {kind}s; remove it")
        inputs = ModelInputs(token_ids=ids, images=items, prompt=text, image_token_id=self.image_token_id, chat=True)
        return self.finish(inputs)

    def preprocess_video(self, source: Any, options: dict[str, Any]) -> ImageInput:
        """One video (a file's path, URL or bytes, or a list of frames) -> temporal patches within its
        part's sampling and budget ``options``."""
        from .video import frame_size, sample_frame_indices, stack_frames, video_patches

        settings = self.video_settings.within(options)
        total_pixels = options.get("total_pixels")
        if isinstance(source, (list, tuple)):  # frames, taken at ``fps`` (qwen-vl-utils' rule)
            sampling = [key for key in ("nframes", "min_frames", "max_frames") if key in options]
            if sampling:
                raise InputError(
                    f"{', '.join(sampling)} choose frames from a video file, but this video is given as its frames, "
                    "which are all taken; send only the frames you want"
                )
            frames = stack_frames([to_rgb(image) for image in load_frames(source)])
            indices = list(range(len(frames)))
            sampled_fps = settings.fps
        else:
            with open_video(source) as video:
                indices = sample_frame_indices(video.total_frames, video.fps, settings, options.get("nframes"))
                # refuse a video the model cannot hold before a frame is decoded
                self._check_video_fits(
                    len(indices), frame_size(video.height, video.width, len(indices), settings, total_pixels), settings
                )
                frames = video.frames(indices)
                sampled_fps = len(indices) / video.total_frames * video.fps
        height, width = frames.shape[1:3]
        patches, grid = video_patches(frames, settings, total_pixels)
        key = hashlib.sha256(f"video:{pixel_values_key(patches)}:{grid}".encode()).hexdigest()
        return ImageInput(
            pixel_values=patches,
            num_tokens=patches.shape[0] // settings.merge_size**2,
            key=key,
            extra={
                "image_grid_thw": grid,  # the tower's grid: t temporal patches of h x w
                "video": True,
                "second_per_grid_t": settings.temporal_patch_size / sampled_fps,
                "frame_indices": indices,
                "image_size": (int(width), int(height)),
                "resized_size": (grid[2] * settings.patch_size, grid[1] * settings.patch_size),
            },
            placeholder_token_id=self.video_token_id,
        )

    def _check_video_fits(self, num_frames: int, size: tuple[int, int], settings: Any) -> None:
        step = settings.temporal_patch_size
        tokens = -(-num_frames // step) * (size[0] // settings.factor) * (size[1] // settings.factor)
        if self.max_positions is not None and tokens >= self.max_positions:
            raise InputError(
                f"a video of {num_frames} sampled frames at {size[1]}x{size[0]} is {tokens:,} tokens, more than this "
                f"model's context of {self.max_positions:,}; lower its fps, max_frames, max_pixels or total_pixels"
            )

    def finish(self, inputs: ModelInputs) -> ModelInputs:
        """Prompts with pictures or videos get their M-RoPE positions; others count 0..T-1 (the engine's default)."""
        if not inputs.images:
            return inputs
        assert self.image_token_id is not None  # set when the preprocessor was built
        items = [
            (
                self.image_token_id if image.placeholder_token_id is None else image.placeholder_token_id,
                image.extra["image_grid_thw"],
                self._temporal_interval(image),
            )
            for image in inputs.images
        ]
        positions, delta = mrope_positions_of(inputs.token_ids, items, self.settings.merge_size)
        return dataclasses.replace(inputs, positions=positions, position_delta=delta)

    def _temporal_interval(self, image: ImageInput) -> Any:
        """How far apart a video's temporal patches sit (Qwen2.5-VL: ``tokens_per_second`` x its
        seconds per patch, in float32 as transformers computes it); 1 for pictures and Qwen2-VL."""
        if self.tokens_per_second is None or not image.extra.get("video"):
            return 1
        import torch

        return self.tokens_per_second * torch.tensor(image.extra["second_per_grid_t"], dtype=torch.float32)


def _count(kinds: list[str]) -> str:
    pictures, videos = kinds.count("image"), kinds.count("video")
    return f"{pictures} picture(s) and {videos} video(s)"


__all__ = [
    "LOW_DETAIL_MAX_PIXELS",
    "ImageSettings",
    "Qwen2VLPreprocessor",
    "mrope_positions",
    "mrope_positions_of",
    "patchify",
    "preprocess_pixels",
    "smart_resize",
]
