"""vlm-plugin-qwen2vl through the conformance kit that every plugin uses (vlm.testing.conformance),
for Qwen2-VL and Qwen2.5-VL, with transformers' models as greedy-parity references (called with
the grids and token types they need, see vlm_plugin_qwen2vl.testing.ReferenceModel) and
transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor as the preprocessing reference (token ids,
and the flattened patches in the same order)."""

from __future__ import annotations

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests
from vlm_plugin_qwen2vl.testing import (
    FLAVORS,
    ReferenceModel,
    load_reference_processor,
    reference_inputs,
    write_tiny_qwen2_vl,
)


class TestQwen2VLConformance(PluginConformanceTests):
    plugin = "qwen2vl"
    reference = ReferenceModel
    reference_inputs = staticmethod(reference_inputs)
    reference_processor = staticmethod(load_reference_processor)
    foreign_configs = [
        RawConfig({"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl"}),
        RawConfig({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}),
    ]

    @pytest.fixture(scope="class", params=FLAVORS)
    @classmethod
    def checkpoint(cls, request, tmp_path_factory):
        return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=1))
