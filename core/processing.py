"""Helpers that VLM preprocessors share: reading a model directory's processor files, and
transformers' image conventions that pixel-for-pixel parity depends on.

- :func:`read_json` reads ``preprocessor_config.json`` / ``processor_config.json`` with one-line
  errors; :func:`find_chat_template` finds the chat template transformers' *processor* would use
  (which may differ from the tokenizer's).
- :func:`to_rgb` converts a PIL image to RGB as transformers' image processors do (transparency
  composited onto white); :func:`rescale_and_normalize` turns uint8 pixels into float32 values
  with transformers' arithmetic (rescale in float64, cast, normalise in float32), bit for bit.

Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.errors import ConfigError


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; fix or re-download it")
    return data


def find_chat_template(model_path: str | Path, tokenizer: Any) -> str | None:
    """The template transformers' processor would use: the processor's, else the tokenizer's."""
    model_path = Path(model_path)
    jinja = model_path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        template = (read_json(model_path / name) or {}).get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def to_rgb(image: Any) -> Any:
    """RGB, compositing transparency onto white (transformers' image-processor rule)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def rescale_and_normalize(pixels: Any, rescale_factor: float | None, mean: Any | None, std: Any | None) -> Any:
    """uint8 ``[C, H, W]`` (numpy) -> float32, as transformers' numpy image processors compute it.

    ``x * rescale_factor`` in float64 cast to float32, then ``(x - mean) / std`` in float32 with
    float32 mean and std per channel; ``None`` skips a step.
    """
    import numpy as np

    values = pixels.astype(np.float64)
    if rescale_factor is not None:
        values = values * rescale_factor
    values = values.astype(np.float32)
    if mean is not None and std is not None:
        mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        std = np.asarray(std, dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return values


__all__ = ["find_chat_template", "read_json", "rescale_and_normalize", "to_rgb"]
