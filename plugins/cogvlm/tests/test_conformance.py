"""vlm-plugin-cogvlm through the conformance kit, with the plain-torch reference
(vlm_plugin_cogvlm.reference) for greedy parity and the original preprocessing for token ids and
pixels. CogVLM takes one picture per conversation (``max_images = 1``); the SAT layout holds the
CogVLM 1 weights, so its reference is loaded from the Hub sibling."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests
from vlm_plugin_cogvlm.reference import CogVLMReference, reference_inputs
from vlm_plugin_cogvlm.testing import tiny_original_processor


def reference_from_hub_sibling(path: str):
    return CogVLMReference.from_pretrained(Path(path).parent / "cogvlm")


class CogVLMConformance(PluginConformanceTests):
    plugin = "cogvlm"
    max_images = 1
    reference = CogVLMReference
    reference_inputs = staticmethod(reference_inputs)
    reference_processor = staticmethod(tiny_original_processor)
    foreign_configs = [RawConfig({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})]


class TestCogVLM2(CogVLMConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, cogvlm_checkpoints):
        return cogvlm_checkpoints["cogvlm2"]


class TestCogVLM1(CogVLMConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, cogvlm_checkpoints):
        return cogvlm_checkpoints["cogvlm"]


class TestSATLayout(CogVLMConformance):
    reference = staticmethod(reference_from_hub_sibling)

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, cogvlm_checkpoints):
        return cogvlm_checkpoints["sat"]
