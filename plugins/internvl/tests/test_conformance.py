"""vlm-plugin-internvl through the conformance kit that every plugin uses (vlm.testing.conformance).

Both checkpoint layouts hold the same tiny random weights, so transformers'
InternVLForConditionalGeneration (loaded from the Hugging Face layout) is the greedy-parity
reference for both: the kit feeds it the token ids and pixels our preprocessor made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests
from vlm_plugin_internvl.testing import write_tiny_internvl


@pytest.fixture(scope="module")
def internvl_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-conformance")
    return {layout: str(write_tiny_internvl(root / layout, layout, seed=0)) for layout in ("hf", "original")}


def reference_from_hf_sibling(path: str):
    """The original layout has no transformers class: load the same weights from the HF layout."""
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(Path(path).parent / "hf"))


class InternVLConformance(PluginConformanceTests):
    plugin = "internvl"
    foreign_configs = [RawConfig({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})]


class TestHuggingFaceLayout(InternVLConformance):
    reference = "transformers:InternVLForConditionalGeneration"

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, internvl_checkpoints):
        return internvl_checkpoints["hf"]


class TestOriginalLayout(InternVLConformance):
    reference = reference_from_hf_sibling

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, internvl_checkpoints):
        return internvl_checkpoints["original"]
