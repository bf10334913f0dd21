"""vlm plugin for LLaVA: LLaVA-1.5 (CLIP or SigLIP tower) and LLaVA-NeXT (anyres tiles).

The vision tower and projector live here; the language model (Llama, Mistral, Qwen2, ...) comes
from whichever plugin claims the nested text config. torch is imported only inside the hooks.
"""

from __future__ import annotations

from vlm.plugin import claim_by_architecture, hookimpl

__version__ = "0.1.0"
vlm_api_version = ">=1.1,<2"  # builds its components through vlm.registry (contract 1.1)

#: architecture name -> model_type, as in config.json
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
}


@hookimpl
def architectures():
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    return claim_by_architecture(hf_config, ARCHITECTURES)


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_llava.preprocess import LlavaPreprocessor

    return LlavaPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_llava.model import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    is_next = "LlavaNextForConditionalGeneration" in (getattr(hf_config, "architectures", None) or []) or (
        getattr(hf_config, "model_type", None) == "llava_next"
    )
    model_class = LlavaNextForConditionalGeneration if is_next else LlavaForConditionalGeneration
    return model_class(hf_config, model_config, dtype=dtype, device=device)
