"""The language half of Qwen2-VL / Qwen2.5-VL: Qwen2 with multimodal rope.

Its nested text config has ``model_type`` ``qwen2_vl_text`` / ``qwen2_5_vl_text``, which no LLM
plugin knows. This small plugin (entry point ``qwen2vl-text``) claims those configs at a low
priority, rewrites them as the ``Qwen2Config`` they are (:func:`as_qwen2_config`, keeping
``mrope_section``: the core's rotary applies M-RoPE from it) and asks the core for that model, so
vlm-plugin-llama's Qwen2 serves it and no decoder code is written twice. A plugin that serves
these configs itself at priority 0 or more takes precedence.
"""

from __future__ import annotations

from typing import Any

from vlm.plugin import Claim, hookimpl

vlm_api_version = ">=1.0,<2"

TEXT_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")


def as_qwen2_config(text_config: Any) -> Any:
    """The ``transformers.Qwen2Config`` with the fields of a Qwen2-VL text config.

    ``rope_parameters`` is kept whole (``mrope_section`` included); ``tie_word_embeddings`` is the
    attribute of ``text_config`` (the VLM copies its top-level flag there: transformers ties the
    LM head by the top-level flag of a composite config).
    """
    from transformers import Qwen2Config

    fields = dict(text_config.to_dict())
    rope = dict(fields.pop("rope_parameters", None) or fields.pop("rope_scaling", None) or {})
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "tie_word_embeddings"):
        fields.pop(key, None)
    # transformers validates rope keys per rope type and warns about mrope_section, which plain
    # Qwen2 does not know: build with the standard keys, then put the full dict back
    standard = {key: rope[key] for key in ("rope_theta", "rope_type") if key in rope}
    config = Qwen2Config(**fields, rope_parameters=standard or None, architectures=["Qwen2ForCausalLM"])
    config.rope_parameters = rope or config.rope_parameters
    config.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
    return config


@hookimpl
def architectures():
    return []  # nested text configs name no architecture


@hookimpl
def match(hf_config):
    model_type = getattr(hf_config, "model_type", None)
    if model_type in TEXT_MODEL_TYPES:
        return Claim(priority=-1, reason=f"model_type {model_type}, served as Qwen2")
    return None


@hookimpl
def build_preprocessor(tokenizer):
    from vlm.plugin import TextPreprocessor

    return TextPreprocessor(tokenizer)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm.plugin import build_language_model

    return build_language_model(as_qwen2_config(hf_config), model_config, dtype, device)
