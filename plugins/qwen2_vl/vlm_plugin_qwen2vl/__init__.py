"""vlm plugin for Qwen2-VL and Qwen2.5-VL (Hugging Face layout).

The vision tower (dynamic resolution, 2-D rotary, window attention for 2.5), the patch merger and
the parser of the boxes the models write (:mod:`vlm_plugin_qwen2vl.grounding`) live here; the
language model is Qwen2 from whichever plugin serves ``Qwen2ForCausalLM`` (vlm-plugin-llama),
reached through the nested text config (see :mod:`vlm_plugin_qwen2vl.text`). torch is imported
only inside the hooks.
"""

from __future__ import annotations

from vlm.plugin import VISION_TOWERS, Registry, claim_by_architecture, hookimpl

__version__ = "0.1.0"
# builds its components through vlm.registry (contract 1.1), parses its boxes (parse_grounding, 1.2)
vlm_api_version = ">=1.2,<2"

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


#: The tower, for any plugin to build by name (imported on first use: this module stays torch-free)
TOWERS = Registry("vision_tower", parent=VISION_TOWERS, scope="qwen2vl")
TOWERS.register_module(name="Qwen2VisionTower", module="vlm_plugin_qwen2vl.model:build_qwen2_vision_tower")


@hookimpl
def architectures():
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    return claim_by_architecture(hf_config, ARCHITECTURES)


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_qwen2vl.preprocess import Qwen2VLPreprocessor

    return Qwen2VLPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_qwen2vl.model import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration(hf_config, model_config, dtype=dtype, device=device)


@hookimpl
def parse_grounding(text, image_sizes, hf_config, model_inputs):
    from vlm_plugin_qwen2vl.grounding import parse_grounding

    return parse_grounding(text, image_sizes, hf_config, model_inputs)
