"""What the checks feed a plugin: odd pictures, prompts of different shapes, configs of other families."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlm.config import RawConfig


def with_tokens_appended(inputs: Any, tokens: list[int]) -> Any:
    """The prompt followed by ``tokens`` as one prompt; explicit positions (``[3, T]`` or ``[T]``)
    are extended the way the engine places generated tokens: ``index + position_delta`` in every row."""
    import torch

    full = dataclasses.replace(inputs, token_ids=inputs.token_ids + tokens)
    if getattr(inputs, "positions", None) is None:
        return full
    start = inputs.positions.shape[-1]  # positions are [3, T] (M-RoPE) or [T]
    more = torch.arange(start, start + len(tokens)).expand(*inputs.positions.shape[:-1], -1) + inputs.position_delta
    return dataclasses.replace(full, positions=torch.cat([inputs.positions, more.to(inputs.positions.dtype)], dim=-1))


def describe_config(config: Any) -> str:
    return f"architectures={getattr(config, 'architectures', None)} model_type={getattr(config, 'model_type', None)!r}"


def random_picture(seed: int, size: tuple[int, int], mode: str = "RGB"):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def odd_images() -> list[tuple[str, Any]]:
    """``(label, PIL image)`` pairs of sizes and modes a preprocessor must handle."""
    from PIL import Image

    return [
        ("1x1 RGB", Image.new("RGB", (1, 1), (200, 30, 30))),
        ("17x300 RGB", random_picture(11, (17, 300))),
        ("300x17 RGB", random_picture(12, (300, 17))),
        ("1000x50 RGB", random_picture(17, (1000, 50))),
        ("64x48 RGBA (transparent)", random_picture(13, (64, 48), "RGBA")),
        ("33x33 L (grayscale)", random_picture(14, (33, 33), "L")),
        ("40x24 P (palette)", random_picture(15, (40, 24), "P")),
        ("20x20 CMYK", random_picture(16, (20, 20), "CMYK")),
    ]


def image_message(*images: Any, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    """One user message holding ``images`` then ``text`` (OpenAI-style content parts)."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def default_prompts(is_vlm: bool) -> list[Any]:
    """Prompts of different lengths; for a VLM: one image, two images, and no image."""
    if is_vlm:
        return [
            image_message(random_picture(1, (90, 50)), text="Describe this."),
            image_message(random_picture(2, (40, 120)), random_picture(3, (60, 60)), text="Compare them."),
            [{"role": "user", "content": "Hello there, no picture today."}],
        ]
    return ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"]


def describe_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return repr(prompt[:40])
    from vlm.inputs import has_image_parts, iter_image_parts

    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        images = len(list(iter_image_parts(prompt))) if has_image_parts(prompt) else 0
        return f"chat with {images} image(s)"
    return f"{type(prompt).__name__} prompt"


#: Configs of families no plugin should claim. A plugin that claims one of them claims
#: everything, and would take models of other families away from the plugins that serve them.
def probe_configs() -> list[Any]:
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return [
        RawConfig({"architectures": ["VlmConformanceProbeForCausalLM"], "model_type": "vlm_conformance_probe", **text}),
        RawConfig({"model_type": "vlm_conformance_probe", **text}),  # architectures is None
        RawConfig(
            {
                "architectures": ["VlmConformanceProbeForConditionalGeneration"],
                "model_type": "vlm_conformance_probe_vl",
                "text_config": {
                    "architectures": ["VlmConformanceProbeTextModel"],
                    "model_type": "vlm_conformance_probe_text",
                    **text,
                },
                "vision_config": {"model_type": "vlm_conformance_probe_vision", "hidden_size": 16},
            }
        ),
    ]
