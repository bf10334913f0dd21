"""vlm plugin for InternVL (2, 2.5, 3): both the Hugging Face and the original OpenGVLab layouts.

The vision tower, the projector and the parser of the boxes InternVL writes
(:mod:`vlm_plugin_internvl.grounding`) live here; the language model (Qwen2, Llama, InternLM2) comes
from whichever plugin claims the nested text config. torch is imported only inside the hooks.
"""

from __future__ import annotations

from vlm.plugin import VISION_TOWERS, Registry, claim_by_architecture, hookimpl

__version__ = "0.1.0"
# builds its components through vlm.registry (contract 1.1), parses its boxes (parse_grounding, 1.2)
vlm_api_version = ">=1.2,<2"

ARCHITECTURES = {
    "InternVLForConditionalGeneration": "internvl",  # Hugging Face layout
    "InternVLChatModel": "internvl_chat",  # original OpenGVLab layout
}


#: InternViT, for any plugin to build by name: VISION_TOWERS.build(dict(type="internvl.InternVisionTower",
#: hf_config=..., dtype=..., device=...)) (imported on first use: this module stays torch-free)
TOWERS = Registry("vision_tower", parent=VISION_TOWERS, scope="internvl")
TOWERS.register_module(name="InternVisionTower", module="vlm_plugin_internvl.model:build_intern_vision_tower")


@hookimpl
def architectures():
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    return claim_by_architecture(hf_config, ARCHITECTURES)


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_internvl.preprocess import InternVLPreprocessor

    return InternVLPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_internvl.model import InternVLChatModel

    return InternVLChatModel(hf_config, model_config, dtype=dtype, device=device)


@hookimpl
def parse_grounding(text, image_sizes):
    from vlm_plugin_internvl.grounding import parse_grounding

    return parse_grounding(text, image_sizes)
