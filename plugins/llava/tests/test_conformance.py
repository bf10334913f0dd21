"""vlm-plugin-llava through the conformance kit every plugin uses (vlm.testing.conformance), with
transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration as the reference."""

from __future__ import annotations

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests


def next_reference_inputs(inputs):
    """LLaVA-NeXT's reference also needs every image's (height, width)."""
    import torch

    if not inputs.images:
        return {}
    return {
        "pixel_values": torch.cat([image.pixel_values for image in inputs.images]),
        "image_sizes": torch.tensor([image.extra["original_size"] for image in inputs.images]),
    }


class LlavaConformance(PluginConformanceTests):
    plugin = "llava"
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

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, llava_checkpoints):
        return llava_checkpoints["llava-next-clip-mistral"]
