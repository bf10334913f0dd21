"""vlm-plugin-llama through the conformance kit that every plugin uses (vlm.testing.conformance).

Two families: Qwen2 (q/k/v bias) and Qwen3 (per-head q/k norms), each against its transformers
class for greedy parity and its transformers tokenizer for preprocessing (string prompts and chat
messages give the token ids the tokenizer and its chat template give). test_parity.py goes
further (all families, 32 tokens, logits per step).
"""

from __future__ import annotations

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def checkpoint(request, tiny_models):
    return tiny_models(request.param)


class TestLlamaConformance(PluginConformanceTests):
    plugin = "llama"
    reference = "transformers:AutoModelForCausalLM"
    reference_processor = "transformers:AutoTokenizer"  # text-only: token ids only
    # a VLM wrapper is not a language model: the llama plugin must leave it to the VLM plugin
    foreign_configs = [RawConfig({"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"})]
