"""vlm plugin for Llama-family decoder-only language models: Llama, Mistral, Qwen2, Qwen3, InternLM2.

It also serves these models as the language half of a VLM (a VLM plugin asks the core for the
model of its nested text config, and the core asks this plugin). torch is imported only inside
the hooks that build something.
"""

from __future__ import annotations

from vlm.plugin import claim_by_architecture, hookimpl

__version__ = "0.1.0"
vlm_api_version = ">=1.0,<2"

#: architecture name -> model_type, as in config.json
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "InternLM2ForCausalLM": "internlm2",
}


@hookimpl
def architectures():
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    return claim_by_architecture(hf_config, ARCHITECTURES)


@hookimpl
def build_preprocessor(tokenizer):
    from vlm.plugin import TextPreprocessor

    return TextPreprocessor(tokenizer)


def _is_internlm2(hf_config) -> bool:
    architectures = getattr(hf_config, "architectures", None) or []
    return "InternLM2ForCausalLM" in architectures or getattr(hf_config, "model_type", None) == "internlm2"


@hookimpl
def build_model(hf_config, dtype, device):
    if _is_internlm2(hf_config):
        from vlm_plugin_llama.internlm2 import InternLM2ForCausalLM

        return InternLM2ForCausalLM(hf_config, dtype=dtype, device=device)
    from vlm_plugin_llama.model import LlamaForCausalLM

    return LlamaForCausalLM(hf_config, dtype=dtype, device=device)
