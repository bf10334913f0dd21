"""vlm plugin: the transformers fallback.

Serves, at a low priority (-100), any decoder-only model that transformers' auto classes
(``AutoModelForImageTextToText``, ``AutoModelForCausalLM``) can build and no other plugin claims:
the model is the transformers class itself, its attention routed into vlm's paged KV cache
(``model.py``), its images encoded by its own ``get_image_features``, its prompts made by its own
processor (``preprocess.py``). Families whose attention the engine cannot express are refused with
one line naming the reason (``families.py``). torch is imported only inside the build hooks.
"""

from __future__ import annotations

from vlm.plugin import Claim, hookimpl

__version__ = "0.1.0"
vlm_api_version = ">=1.0,<2"

#: below every first-party plugin (qwen2vl-text's -1 included): only what nobody else serves
PRIORITY = -100


@hookimpl
def architectures():
    # every class in transformers' causal-LM and image-text-to-text tables: too many to list
    return []


@hookimpl
def match(hf_config):
    from vlm_plugin_transformers.families import model_class_name

    if not hasattr(hf_config, "to_dict"):  # a RawConfig: transformers does not know this model type
        return None
    name = model_class_name(hf_config)
    if name is None:
        return None
    return Claim(priority=PRIORITY, reason=f"fallback: {name}")


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_transformers.families import check_supported, is_vision_language, model_class_name

    check_supported(hf_config)
    name = model_class_name(hf_config)
    if name is None or not is_vision_language(name) or getattr(hf_config, "vision_config", None) is None:
        from vlm.plugin import TextPreprocessor

        return TextPreprocessor(tokenizer)
    from vlm_plugin_transformers.preprocess import ProcessorPreprocessor

    return ProcessorPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_transformers.families import check_supported
    from vlm_plugin_transformers.model import TransformersModel

    check_supported(hf_config)
    return TransformersModel(hf_config, dtype=dtype, device=device)
