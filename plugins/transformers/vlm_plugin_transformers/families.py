"""Which transformers class serves a config, and what the fallback refuses, without importing torch.

``transformers.models.auto.modeling_auto`` imports torch, so its name tables
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: model_type
-> class name) are read from its source with :mod:`ast` instead: ``vlmrun plugins`` and ``match``
stay torch-free, and the tables are transformers' own, for whichever version is installed.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlm.plugin import ConfigError

CAUSAL_LM = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
IMAGE_TEXT_TO_TEXT = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"

#: attention layer kinds the engine's paged attention expresses (``layer_types`` in text configs)
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}

#: families whose images reach the language model through cross-attention layers, not placeholder
#: tokens: their text-only prompts run (those layers are skipped without images), images are refused
CROSS_ATTENTION_FAMILIES = {"mllama"}


@lru_cache(maxsize=1)
def auto_mappings() -> dict[str, dict[str, str]]:
    """``{table name: {model_type: class name}}`` as transformers' auto classes hold them."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return {CAUSAL_LM: {}, IMAGE_TEXT_TO_TEXT: {}}
    source = Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py"
    tables: dict[str, dict[str, str]] = {CAUSAL_LM: {}, IMAGE_TEXT_TO_TEXT: {}}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name in tables and isinstance(node.value, ast.Call) and node.value.args:
            pairs = ast.literal_eval(node.value.args[0])  # OrderedDict([(model_type, class name), ...])
            tables[name] = {model_type: cls for model_type, cls in pairs if isinstance(cls, str)}
    return tables


def model_class_name(hf_config: Any) -> str | None:
    """The transformers class that builds ``hf_config``: its ``architectures`` entry when the auto
    tables list it for its model type, else the image-text-to-text class, else the causal-LM class."""
    model_type = getattr(hf_config, "model_type", None)
    tables = auto_mappings()
    candidates = [table[model_type] for table in (tables[IMAGE_TEXT_TO_TEXT], tables[CAUSAL_LM]) if model_type in table]
    if not candidates:
        return None
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in candidates:
            return arch
    return candidates[0]


def is_vision_language(class_name: str) -> bool:
    return class_name in auto_mappings()[IMAGE_TEXT_TO_TEXT].values()


def text_config_of(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def refusal(hf_config: Any) -> str | None:
    """Why the fallback cannot run this config (one line), or None when it can."""
    model_type = getattr(hf_config, "model_type", "?")
    name = model_class_name(hf_config) or model_type
    family = f"{model_type} ({name})"
    if getattr(hf_config, "is_encoder_decoder", False):
        return f"{family} is an encoder-decoder model; the transformers fallback runs decoder-only models"
    text = text_config_of(hf_config)
    layer_types = set(getattr(text, "layer_types", None) or ())
    other = sorted(layer_types - ATTENTION_LAYER_TYPES)
    if other:
        return (
            f"{family} has {', '.join(other)} layers, which vlm's paged KV cache cannot hold (it keeps "
            "attention keys and values only)"
        )
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return f"{family} soft-caps its attention logits (attn_logit_softcapping), which vlm's attention kernels do not"
    if getattr(text, "attention_chunk_size", None):
        return f"{family} attends in chunks (attention_chunk_size), which vlm's attention kernels do not"
    return None


def check_supported(hf_config: Any) -> None:
    """Raise a one-line :class:`ConfigError` naming the family and the reason it is refused."""
    reason = refusal(hf_config)
    if reason is not None:
        raise ConfigError(f"vlm-plugin-transformers cannot serve this model: {reason}")


def image_refusal(hf_config: Any) -> str | None:
    """Why this family's images cannot run (its text may), or None."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in CROSS_ATTENTION_FAMILIES:
        name = model_class_name(hf_config) or model_type
        return (
            f"{model_type} ({name}) reads images through cross-attention layers, which the transformers fallback "
            "cannot route through vlm's paged KV cache; send text only, or install a plugin for this family"
        )
    return None


__all__ = [
    "auto_mappings",
    "check_supported",
    "image_refusal",
    "is_vision_language",
    "model_class_name",
    "refusal",
]
