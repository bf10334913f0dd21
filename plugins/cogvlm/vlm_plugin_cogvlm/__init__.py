"""vlm plugin for CogVLM (1) and CogVLM2: the Hugging Face Hub layout and CogVLM 1's original SAT layout.

CogVLM is not a LLaVA-style "tower + projector + a language model from another plugin": every
decoder layer holds visual experts (a second QKV / dense and MLP for image tokens), so the whole
model lives here, built from ``vlm.nn`` blocks (``VisualExpertQKV``, ``VisualExpertMLP``). The
config builder reads both layouts (:mod:`vlm_plugin_cogvlm.config`). torch is imported only inside
the hooks.
"""

from __future__ import annotations

from vlm.plugin import CONFIG_BUILDERS, VISION_TOWERS, Registry, claim_by_architecture, hookimpl

__version__ = "0.1.0"
vlm_api_version = ">=1.1,<2"  # a config builder (contract 1.1); parse_grounding is optional (1.2)

ARCHITECTURES = {"CogVLMForCausalLM": "cogvlm"}

#: the layouts' configs -> one config in the Hub's naming (imported on first use: no torch here)
BUILDERS = Registry("config_builder", parent=CONFIG_BUILDERS, scope="cogvlm")
BUILDERS.register_module(name="CogVLMConfigBuilder", module="vlm_plugin_cogvlm.config:CogVLMConfigBuilder")

#: EVA2-CLIP as CogVLM sets it up, for any plugin to build by name ("cogvlm.EVA2CLIPVisionTower")
TOWERS = Registry("vision_tower", parent=VISION_TOWERS, scope="cogvlm")
TOWERS.register_module(name="EVA2CLIPVisionTower", module="vlm_plugin_cogvlm.model:build_eva2clip_tower")


@hookimpl
def architectures():
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    # by architecture only: the nested Llama-shaped text_config (model_type "llama") is not ours
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return claim_by_architecture(hf_config, ARCHITECTURES)
    return None


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_cogvlm.preprocess import CogVLMPreprocessor

    return CogVLMPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, dtype, device):
    from vlm_plugin_cogvlm.model import CogVLMForCausalLM

    return CogVLMForCausalLM(hf_config, dtype=dtype, device=device)


@hookimpl
def parse_grounding(text, image_sizes):
    from vlm_plugin_cogvlm.grounding import parse_boxes

    return parse_boxes(text, image_sizes)
