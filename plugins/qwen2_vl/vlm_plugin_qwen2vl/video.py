"""Qwen2-VL / Qwen2.5-VL video preprocessing: frames -> flattened temporal patches, as
transformers' ``Qwen2VLVideoProcessor`` makes them.

- **settings** (:class:`VideoSettings`): from the video processor's entry of
  ``processor_config.json``, else ``video_preprocessor_config.json``, else
  ``preprocessor_config.json`` (transformers' order; a checkpoint with the image file only gives
  its frames the image budget), over the video processor's defaults.
- **frame sampling** (:func:`sample_frame_indices`, for a decoded video file): ``fps`` frames per
  second (default :data:`DEFAULT_FPS`, qwen-vl-utils' 2), at least ``min_frames`` and at most
  ``max_frames`` and the video's own frames, rounded down to a multiple of the temporal patch
  (2 frames); or ``nframes`` frames rounded to that multiple. Indices
  ``arange(0, total, total / n)`` truncated, as transformers' ``Qwen2VLVideoProcessor.sample_frames``.
  A list of frames is taken as it is, at the rate ``fps`` (default 2) it was taken at.
- **pixels** (:func:`video_patches`): every frame resized to one :func:`smart_resize` size
  (within ``[min_pixels, max_pixels]`` per frame; with ``total_pixels``, or
  ``cap_pixels_per_frame`` in the config, each frame also gets at most an even share of the
  video's budget, transformers' and qwen-vl-utils' cap) with torch's antialiased bicubic resize on
  uint8 frames (what torchvision runs on CPU, which transformers' video processor calls, unlike
  the PIL resize of pictures), normalised with mean and std pre-multiplied by ``1 / rescale_factor``
  (transformers' fused rescale-and-normalize), the frame count padded to a multiple of
  ``temporal_patch_size`` with the last frame, then cut into ``[t * h * w, C * 2 * 14 * 14]`` rows,
  each 2 x 2 block of patches consecutive. ``ImageInput.extra["image_grid_thw"]`` is the tower's
  grid ``(t, h, w)`` (``t`` = frames / 2), the same key a picture's grid has.
- **positions**: Qwen2.5-VL spaces a video's temporal positions by ``tokens_per_second *
  second_per_grid_t`` (``second_per_grid_t = temporal_patch_size / sampled fps``); Qwen2-VL by 1.
  :func:`vlm_plugin_qwen2vl.preprocess.mrope_positions_of` computes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.plugin import ConfigError, InputError, read_json

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, smart_resize

#: frames per second sampled from a video file (and the rate a list of frames is taken to have)
#: when neither the request nor the config says: qwen-vl-utils' FPS
DEFAULT_FPS = 2.0
#: ``Qwen2VLVideoProcessor``'s defaults
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MIN_FRAMES = 4
MAX_FRAMES = 768
MAX_VIDEO_TOKENS = 128000
#: PIL resampling filters (preprocessor_config.json's ``resample``) -> torch interpolate modes, as
#: transformers maps them for its torchvision backend
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class VideoSettings:
    """How frames become patches (the fields of ``Qwen2VLVideoProcessor``)."""

    min_pixels: int = VIDEO_MIN_PIXELS  # per frame
    max_pixels: int = VIDEO_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_frames: int = MIN_FRAMES
    max_frames: int = MAX_FRAMES
    fps: float = DEFAULT_FPS
    resample: str = "bicubic"
    do_resize: bool = True
    rescale_factor: float | None = 1 / 255  # None: no rescaling
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # None: no normalisation
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    #: bound each frame by an even share of ``max_video_tokens`` tokens' worth of pixels (90%)
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = MAX_VIDEO_TOKENS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(cls, model_path: str | Path) -> VideoSettings:
        """The video processor's settings as transformers' ``AutoVideoProcessor`` finds them."""
        model_path = Path(model_path)
        data = (read_json(model_path / "processor_config.json") or {}).get("video_processor")
        where = model_path / "processor_config.json"
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if data is None:
                data, where = read_json(model_path / name), model_path / name
        data = data or {}
        size = data.get("size") or {}
        min_pixels = data.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels
        max_pixels = data.get("max_pixels") or size.get("longest_edge") or cls.max_pixels
        if not 0 < int(min_pixels) <= int(max_pixels):
            raise ConfigError(
                f"{where}: the video min_pixels ({min_pixels}) must be positive and at most max_pixels ({max_pixels})"
            )
        resample = int(data.get("resample", 3))
        if resample not in RESAMPLE_MODES:
            raise ConfigError(
                f"{where}: resample {resample} has no tensor resize for video frames (transformers' video "
                "processor has none either); use 3 (bicubic), 2 (bilinear) or 0 (nearest)"
            )
        normalize = data.get("do_normalize", True)
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(data.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(data.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(data.get("merge_size", cls.merge_size)),
            min_frames=int(data.get("min_frames", cls.min_frames)),
            max_frames=int(data.get("max_frames", cls.max_frames)),
            fps=float(data.get("fps") or DEFAULT_FPS),
            resample=RESAMPLE_MODES[resample],
            do_resize=bool(data.get("do_resize", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else None,
            mean=tuple(data.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(data.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
            cap_pixels_per_frame=bool(data.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(data.get("max_video_tokens", cls.max_video_tokens)),
        )

    def within(self, options: dict[str, Any]) -> VideoSettings:
        """These settings with a video part's own options (:data:`vlm.inputs.messages.VIDEO_OPTION_KEYS`)."""
        changes: dict[str, Any] = {
            key: options[key] for key in ("min_pixels", "max_pixels", "min_frames", "max_frames") if key in options
        }
        if "fps" in options:
            changes["fps"] = float(options["fps"])
        settings = dataclasses.replace(self, **changes) if changes else self
        if settings.min_pixels > settings.max_pixels:
            if "min_pixels" in options:
                raise InputError(
                    f"the video's min_pixels ({settings.min_pixels}) exceeds max_pixels ({settings.max_pixels}); "
                    "lower or raise one"
                )
            settings = dataclasses.replace(settings, min_pixels=settings.max_pixels)  # the part's budget wins
        return settings


# ----------------------------------------------------------------------------- frames


def sample_frame_indices(
    total_frames: int, video_fps: float, settings: VideoSettings, nframes: int | None = None
) -> list[int]:
    """Which frames of a decoded video to take (transformers' ``Qwen2VLVideoProcessor.sample_frames``)."""
    import torch

    step = settings.temporal_patch_size
    if nframes is not None:
        count = round(nframes / step) * step
    else:
        most = math.floor(min(settings.max_frames, total_frames) / step) * step
        wanted = total_frames / video_fps * settings.fps
        count = math.floor(min(max(wanted, settings.min_frames), most, total_frames) / step) * step
    if count <= 0:
        raise InputError(
            f"a video of {total_frames} frame(s) gives no {step}-frame temporal patch at these settings; send a "
            f"longer video, a list of at least {step} frames, or the frame as an image"
        )
    if count > total_frames:
        raise InputError(
            f"nframes asks for {count} frames but the video has {total_frames}; ask for at most {total_frames}"
        )
    # float32 indices truncated, exactly as transformers takes them
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def frame_size(
    height: int, width: int, num_frames: int, settings: VideoSettings, total_pixels: int | None
) -> tuple[int, int]:
    """``(height, width)`` every frame is resized to: :func:`smart_resize` within the per-frame
    budget, capped by an even share of ``total_pixels`` (or of the config's ``max_video_tokens``
    when it sets ``cap_pixels_per_frame``), never below 1.05 x ``min_pixels`` (transformers' rule)."""
    if not settings.do_resize:
        if height % settings.factor or width % settings.factor:
            raise InputError(
                f"{width}x{height} frames cannot be cut into {settings.factor}-px blocks without resizing, and the "
                f"video processor's config says do_resize: false; resize them to multiples of {settings.factor} px"
            )
        return height, width
    max_pixels = settings.max_pixels
    if total_pixels is not None or settings.cap_pixels_per_frame:
        if total_pixels is None:
            total_pixels = int(settings.max_video_tokens * settings.factor * settings.factor * 0.9)
        share = total_pixels * settings.temporal_patch_size // num_frames
        max_pixels = max(min(max_pixels, share), int(settings.min_pixels * 1.05))
    return smart_resize(height, width, settings.factor, settings.min_pixels, max_pixels)


def resize_frames(frames: Any, size: tuple[int, int], mode: str) -> Any:
    """uint8 ``[T, C, H, W]`` -> uint8 ``[T, C, h, w]``: torchvision's tensor resize on CPU
    (antialiased; bicubic and, on AVX2 machines, bilinear on uint8 natively; otherwise in float32,
    rounded back)."""
    import torch
    import torch.nn.functional as F

    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    antialias = mode in ("bilinear", "bicubic")
    native = mode in ("nearest-exact", "bicubic") or "AVX2" in torch.backends.cpu.get_cpu_capability()
    values = frames if native else frames.to(torch.float32)
    values = F.interpolate(
        values, size=list(size), mode=mode, align_corners=False if antialias else None, antialias=antialias
    )
    if native:
        return values
    if mode == "bicubic":
        values = values.clamp_(0, 255)
    return values.round_().to(torch.uint8)


def video_patches(
    frames: Any, settings: VideoSettings, total_pixels: int | None = None
) -> tuple[Any, tuple[int, int, int]]:
    """uint8 RGB frames ``[T, H, W, 3]`` (numpy) -> flattened patches ``[t * h * w, C * T_p * P * P]``
    and the grid ``(t, h, w)``, as ``Qwen2VLVideoProcessor`` makes them (see the module docstring)."""
    import numpy as np
    import torch

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # [T, C, H, W]
    num_frames, channels, height, width = video.shape
    height, width = frame_size(height, width, num_frames, settings, total_pixels)
    video = resize_frames(video, (height, width), settings.resample)
    values = video.to(torch.float32)
    if settings.mean is not None and settings.std is not None:
        mean, std = torch.tensor(settings.mean), torch.tensor(settings.std)
        if settings.rescale_factor is not None:  # one fused step, as transformers does it
            mean, std = mean * (1.0 / settings.rescale_factor), std * (1.0 / settings.rescale_factor)
        values = (values - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    elif settings.rescale_factor is not None:
        values = values * settings.rescale_factor
    p, m, step = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    if pad := -num_frames % step:  # a whole number of temporal patches: repeat the last frame
        values = torch.cat([values, values[-1:].expand(pad, -1, -1, -1)])
    grid = (values.shape[0] // step, height // p, width // p)
    t, h, w = grid
    patches = values.reshape(t, step, channels, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, rows/m, cols/m, m, m, C, T_p, P, P)
    return patches.reshape(t * h * w, channels * step * p * p).contiguous(), grid


def stack_frames(images: list[Any], where: str = "video") -> Any:
    """RGB PIL frames of one size -> uint8 ``[T, H, W, 3]``."""
    import numpy as np

    first = images[0].size
    for index, image in enumerate(images):
        if image.size != first:
            raise InputError(
                f"{where}: frame {index} is {image.size[0]}x{image.size[1]} but frame 0 is {first[0]}x{first[1]}; "
                "send the frames of a video at one size"
            )
    return np.stack([np.asarray(image, dtype=np.uint8) for image in images])


__all__ = [
    "DEFAULT_FPS",
    "VideoSettings",
    "frame_size",
    "resize_frames",
    "sample_frame_indices",
    "stack_frames",
    "video_patches",
]
