{%- set vision = cookiecutter.kind == "vision" -%}
{%- set C = cookiecutter.__class -%}
{% if vision -%}
"""vlm plugin for {{ C }}: a vision-language model. The vision tower and projector live here; the
language model comes from whichever plugin serves the nested text config.
{%- else -%}
"""vlm plugin for {{ C }}: a decoder-only language model.
{%- endif %}

The four hooks below are the whole contract with vlm (see README.md and vlm.hookspecs). This
module must not import torch: ``vlmrun plugins`` imports every plugin to list it, and torch
takes seconds to import. The model and preprocessor modules are imported inside the hooks.
"""

from __future__ import annotations

from vlm.plugin import Claim, hookimpl

__version__ = "0.1.0"

#: The vlm plugin API versions this plugin was written for; vlm refuses it outside this range.
vlm_api_version = ">=1.0,<2"

#: config.json "architectures" values this plugin serves.
ARCHITECTURES = [{% for name in cookiecutter.architectures.split(",") if name.strip() %}"{{ name.strip() }}"{{ ", " if not loop.last }}{% endfor %}]

#: config.json "model_type" of this family.
MODEL_TYPE = "{{ cookiecutter.__model_type }}"


@hookimpl
def architectures():
    """What `vlmrun plugins` lists for this plugin."""
    return list(ARCHITECTURES)


@hookimpl
def match(hf_config):
    """Claim configs of this family, decline everything else (every plugin sees every config)."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return Claim(reason=f"architecture {arch}")
    if getattr(hf_config, "model_type", None) == MODEL_TYPE:
        return Claim(reason=f"model_type {MODEL_TYPE}")
    return None
{% if vision %}

@hookimpl
def build_preprocessor(hf_config, tokenizer):
    """Prompts and images -> token ids with image placeholders expanded, and pixel values."""
    from {{ cookiecutter.__package }}.preprocess import {{ C }}Preprocessor

    return {{ C }}Preprocessor(tokenizer, hf_config)
{% else %}

@hookimpl
def build_preprocessor(tokenizer):
    """Text-only: vlm's TextPreprocessor tokenizes prompts and applies the chat template."""
    from vlm.plugin import TextPreprocessor

    return TextPreprocessor(tokenizer)
{% endif %}

@hookimpl
def build_model(hf_config, model_config, dtype, device):
    """The model with parameters allocated (on ``device``, in ``dtype``) but not loaded."""
{%- if vision %}
    from {{ cookiecutter.__package }}.model import {{ C }}ForConditionalGeneration

    return {{ C }}ForConditionalGeneration(hf_config, model_config, dtype=dtype, device=device)
{%- else %}
    from {{ cookiecutter.__package }}.model import {{ C }}ForCausalLM

    return {{ C }}ForCausalLM(hf_config, dtype=dtype, device=device)
{%- endif %}
