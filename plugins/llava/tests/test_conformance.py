"""vlm-plugin-llava through the conformance kit every plugin uses (vlm.testing.conformance), with
transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration as the reference,
and transformers' LlavaProcessor / LlavaNextProcessor (vlm_plugin_llava.testing.load_reference_processor)
as the preprocessing reference."""

from __future__ import annotations

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests
from vlm_plugin_llava.testing import load_reference_processor


def next_reference_inputs(inputs):
    """LLaVA-NeXT's reference also needs every image's (height, width)."""
    import torch

    if not inputs.images:
        return {}
    return {
        "pixel_values": torch.cat([image.pixel_values for image in inputs.images]),
        "image_sizes": torch.tensor([image.extra["original_size"] for image in inputs.images]),
    }


def next_reference_pixels(outputs):
    """LlavaNextProcessor returns ``[images, tiles, C, H, W]`` (padded to the most tiles); the kit
    sends one image per prompt, so there is no padding: its tiles are vlm's ``[tiles, C, H, W]``."""
    return outputs["pixel_values"].flatten(0, 1)


class LlavaConformance(PluginConformanceTests):
    plugin = "llava"
    reference_processor = staticmethod(load_reference_processor)
    foreign_configs = [
        RawConfig({"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"}),
        # the original LLaVA repos' remote-code class: not a transformers layout
        RawConfig({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"}),
    ]


class TestLlavaClipLlama(LlavaConformance):
    reference = "transformers:LlavaForConditionalGeneration"

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, llava_checkpoints):
        return llava_checkpoints["llava-clip-llama"]


class TestLlavaSiglipQwen2(LlavaConformance):
    reference = "transformers:LlavaForConditionalGeneration"

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, llava_checkpoints):
        return llava_checkpoints["llava-siglip-qwen2"]


class TestLlavaNextClipMistral(LlavaConformance):
    reference = "transformers:LlavaNextForConditionalGeneration"
    reference_inputs = staticmethod(next_reference_inputs)
    reference_pixels = staticmethod(next_reference_pixels)

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, llava_checkpoints):
        return llava_checkpoints["llava-next-clip-mistral"]
