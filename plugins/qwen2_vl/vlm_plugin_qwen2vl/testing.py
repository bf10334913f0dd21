"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints, and transformers' reference processor.

- :func:`write_tiny_qwen2_vl` writes a checkpoint made by transformers'
  ``Qwen2VLForConditionalGeneration`` (``flavor="qwen2_vl"``) or
  ``Qwen2_5_VLForConditionalGeneration`` (``flavor="qwen2_5_vl"``) with random weights, a locally
  built byte-level tokenizer that knows Qwen2-VL's vision tokens, the Qwen2-VL chat template, and
  a ``preprocessor_config.json`` with small ``min_pixels`` / ``max_pixels`` so that pictures
  become a few dozen patches.
- :func:`load_reference_processor` loads transformers' ``Qwen2VLProcessor`` /
  ``Qwen2_5_VLProcessor`` from such a directory (or a real one) without torchvision: the stock
  classes want a video processor, which needs torchvision, so a subclass passes
  ``video_processor=None`` (as :mod:`vlm_plugin_internvl.testing` does for InternVL).
- :class:`ReferenceModel` wraps transformers' model so that it can be called (and ``generate``)
  with token ids, pixels and grids alone, as the conformance kit calls a reference;
  :func:`reference_inputs` gives those arguments for a request preprocessed by vlm.

Sizes: text hidden 64 with 4 heads (head_dim 16, so ``mrope_section`` sums to 8), vision width 32
with 2 heads (head_dim 16: 4 rotary frequencies for rows, 4 for columns). Qwen2.5-VL gets 4
vision blocks, blocks 1 and 3 with full attention and 0 and 2 with window attention over
windows of 2 x 2 merged patches, so images larger than one window exercise the window reorder.

Weights: linear layers use ``initializer_range`` 0.3 (at transformers' 0.02 a random model's greedy
output is one repeated token); vision norms and biases, which transformers starts at 1 and 0,
are randomised too, so a mix-up of two such tensors in a weight loader fails a parity test. The
LM head's rows of the vision tokens are zero (logit 0, never the largest), so greedy output holds
no ``<|image_pad|>`` that a teacher-forced reference would take for a picture's placeholder.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from vlm.testing.checkpoints import build_byte_tokenizer

#: Qwen2-VL's vision tokens, in the order of the real vocabulary (after the ChatML tokens).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
#: Qwen2-VL's grounding markup, special tokens as in the real tokenizer (after the vision tokens,
#: so the vision token ids stay the same)
GROUNDING_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]

#: The chat template of the Qwen2-VL / Qwen2.5-VL Instruct checkpoints (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FLAVORS = ("qwen2_vl", "qwen2_5_vl")

#: Small pixel budgets: 4 to 12 merged tokens (16 to 48 patches of 14 px) per picture.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 12


def build_qwen2_vl_tokenizer():
    """A byte-level BPE tokenizer with ChatML and Qwen2-VL's vision tokens and chat template."""
    tokenizer = build_byte_tokenizer(extra_special_tokens=VISION_TOKENS + GROUNDING_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@cache
def _videoless_processor_classes() -> dict[str, type]:
    from transformers import (
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLProcessor,
    )

    classes = {}
    for flavor, config_class, base in (
        ("qwen2_vl", Qwen2VLConfig, Qwen2VLProcessor),
        ("qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLProcessor),
    ):

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, _base=base, **kwargs):
            _base.__init__(
                self,
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

        cls = type(
            f"Videoless{base.__name__}",
            (base,),
            {
                "__init__": __init__,
                "__doc__": f"{base.__name__} without its video processor (which needs torchvision).",
            },
        )
        # for AutoProcessor on directories whose processor_config.json names no class
        AutoProcessor.register(config_class, cls, exist_ok=True)
        classes[flavor] = cls
    return classes


def load_reference_processor(path: str | Path, flavor: str | None = None):
    """transformers' processor for a Qwen2-VL / Qwen2.5-VL directory, offline and without torchvision."""
    import json

    if flavor is None:
        flavor = json.loads((Path(path) / "config.json").read_text())["model_type"]
    processor_class: Any = _videoless_processor_classes()[flavor]
    return processor_class.from_pretrained(str(path))


def _randomize_vision(model: Any, seed: int) -> None:
    """Give vision norms and biases random values (see the module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".visual." not in f".{name}":
                continue
            noise = torch.randn(param.shape, generator=generator)
            if ("norm" in name or "ln_q" in name) and name.endswith(".weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)


def write_tiny_qwen2_vl(
    path: str | Path,
    flavor: str = "qwen2_vl",
    seed: int = 0,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    **overrides: Any,
) -> Path:
    """Write a tiny random Qwen2-VL (``flavor="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) checkpoint.

    :param min_pixels, max_pixels: the image processor's pixel budget (``smart_resize``).
    :param overrides: ``text_config`` / ``vision_config`` (dicts merged into those configs), anything
        else is a field of the top-level config (e.g. ``tie_word_embeddings``).
    :return: ``path``.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
    import torch
    import transformers

    path = Path(path)
    tokenizer = build_qwen2_vl_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=0.3,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        eos_token_id=token("<|im_end|>"),
        pad_token_id=token("<|endoftext|>"),
        bos_token_id=None,
    )
    text_config.update(overrides.pop("text_config", {}))
    vision_config = dict(
        depth=2,
        embed_dim=32,
        hidden_size=text_config["hidden_size"],
        num_heads=2,
        mlp_ratio=2,
        hidden_act="quick_gelu",
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        initializer_range=0.3,
    )
    if flavor == "qwen2_5_vl":
        vision_config = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            hidden_act="silu",
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=56,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=text_config["hidden_size"],
            initializer_range=0.3,
        )
    vision_config.update(overrides.pop("vision_config", {}))
    config_class, model_class = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    }[flavor]
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        **{"tie_word_embeddings": False, **overrides},
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _randomize_vision(model, seed)
    if not config.tie_word_embeddings:
        # a trained model never emits vision tokens; a random one might, and a reference fed the
        # generated text would then count an extra <|image_pad|> as a picture's placeholder
        with torch.no_grad():
            model.lm_head.weight[[token(t) for t in VISION_TOKENS]] = 0.0
    model.generation_config.eos_token_id = text_config["eos_token_id"]
    model.generation_config.pad_token_id = text_config["pad_token_id"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(path)
    return path


class ReferenceModel:
    """transformers' Qwen2-VL / Qwen2.5-VL model, called as the conformance kit calls a reference:
    ``model(input_ids=[1, T], pixel_values=..., image_grid_thw=...)``. It fills in
    ``mm_token_type_ids`` (1 where ``input_ids`` holds the image token), which transformers needs
    for M-RoPE positions and which depends on the length of ``input_ids``."""

    def __init__(self, model: Any):
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = None) -> ReferenceModel:
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype or torch.float32)
        return cls(model.eval())

    def eval(self) -> ReferenceModel:
        return self

    def token_types(self, input_ids: Any) -> Any:
        return (input_ids == self.model.config.image_token_id).int()

    def __call__(self, input_ids: Any, **kwargs: Any) -> Any:
        if "pixel_values" in kwargs:
            kwargs.setdefault("mm_token_type_ids", self.token_types(input_ids))
        return self.model(input_ids=input_ids, **kwargs)

    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        if "pixel_values" in kwargs:
            kwargs.setdefault("mm_token_type_ids", self.token_types(input_ids))
        return self.model.generate(input_ids, **kwargs)


def reference_inputs(inputs: Any) -> dict[str, Any]:
    """The reference's extra arguments for one request's ``vlm.inputs.ModelInputs``."""
    import torch

    if not inputs.images:
        return {}
    return {
        "pixel_values": torch.cat([image.pixel_values for image in inputs.images]),
        "image_grid_thw": torch.tensor([list(image.extra["image_grid_thw"]) for image in inputs.images]),
    }


__all__ = [
    "CHAT_TEMPLATE",
    "FLAVORS",
    "ReferenceModel",
    "TINY_MAX_PIXELS",
    "TINY_MIN_PIXELS",
    "VISION_TOKENS",
    "build_qwen2_vl_tokenizer",
    "load_reference_processor",
    "reference_inputs",
    "write_tiny_qwen2_vl",
]
