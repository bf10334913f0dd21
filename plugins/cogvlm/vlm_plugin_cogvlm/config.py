"""CogVLM's configs, both checkpoint layouts, under one set of names.

- Hugging Face Hub layout (``cogvlm-chat-hf``, ``cogvlm2-llama3-chat-19B``): config.json with
  ``architectures: ["CogVLMForCausalLM"]``, the decoder's fields at the top level and the EVA2-CLIP
  tower's under ``vision_config``; CogVLM2 adds ``num_multi_query_heads`` (grouped-query attention),
  which is how the two generations are told apart.
- The original SwissArmyTransformer (SAT) layout of CogVLM 1: ``model_config.json`` with
  ``model_class: "CogVLMModel"``, ``num_layers``, ``inner_hidden_size``, ``eva_args`` (the tower),
  and the weights in ``mp_rank_00_model_states.pt``.

:class:`CogVLMConfigBuilder` reads either into one config in the Hub's naming (what every hook then
sees) with a nested Llama-shaped ``text_config`` (the decoder's sizes: the core sizes the KV cache
from it, with CogVLM2's ``num_multi_query_heads`` as ``num_key_value_heads``).
:class:`CogVLMSettings` is what the model and preprocessor read. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.plugin import ConfigBuilder, ConfigError, ModelConfig, RawConfig, build_model_config

ARCHITECTURE = "CogVLMForCausalLM"
#: ``model_class`` of SAT checkpoints this plugin reads (CogVLM 1: chat, base, grounding)
SAT_MODEL_CLASSES = ("CogVLMModel", "FineTuneTestCogVLMModel", "FineTuneTrainCogVLMModel")
#: template names; SAT's ``chat_old`` is the Hub's ``chat`` (``Question: ... Answer:``)
TEMPLATES = ("base", "chat", "vqa")
TEMPLATE_ALIASES = {"chat_old": "chat"}


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


class CogVLMSettings:
    """The fields of a CogVLM config (as :class:`CogVLMConfigBuilder` leaves it) the plugin reads."""

    def __init__(self, hf_config: Any):
        c = hf_config
        self.version = 2 if _get(c, "num_multi_query_heads") is not None else 1
        self.layout = _get(c, "checkpoint_layout", "hub")
        self.hidden_size = int(c.hidden_size)
        self.intermediate_size = int(c.intermediate_size)
        self.num_layers = int(c.num_hidden_layers)
        self.num_heads = int(c.num_attention_heads)
        self.num_kv_heads = int(_get(c, "num_multi_query_heads", self.num_heads))
        self.head_dim = self.hidden_size // self.num_heads
        self.vocab_size = int(c.vocab_size)
        self.rms_norm_eps = float(_get(c, "rms_norm_eps", 1e-5))
        # the original code fixes rope's base: 500000 for CogVLM2 (Llama 3), 10000 for CogVLM 1
        self.rope_theta = float(_get(c, "rope_theta", 500000.0 if self.version == 2 else 10000.0))
        self.max_position_embeddings = int(_get(c, "max_position_embeddings", 2048 if self.version == 1 else 8192))
        template = _get(c, "template_version", "chat")
        self.template = TEMPLATE_ALIASES.get(template, template)
        if self.template not in TEMPLATES:
            raise ConfigError(
                f"template_version {template!r} is not one CogVLM was trained with; use one of {', '.join(TEMPLATES)}"
            )
        v = c.vision_config
        self.vision_hidden_size = int(v.hidden_size)
        self.vision_heads = int(v.num_heads)
        self.vision_layers = int(v.num_hidden_layers)
        self.vision_intermediate_size = int(v.intermediate_size)
        self.patch_size = int(v.patch_size)
        self.image_size = int(v.image_size)
        self.in_channels = int(_get(v, "in_channels", 3))
        self.vision_eps = float(_get(v, "layer_norm_eps", 1e-6))
        self.vision_act = _get(v, "hidden_act", "gelu")
        self.grid = self.image_size // self.patch_size
        # CogVLM2 merges 2x2 patches with a stride-2 conv before the projector
        self.downsample = self.version == 2
        side = self.grid // 2 if self.downsample else self.grid
        #: placeholder tokens per image: boi, the patch features, eoi
        self.image_tokens = side * side + 2


class CogVLMConfigBuilder(ConfigBuilder):
    """Both layouts -> one config in the Hub's naming, with a Llama-shaped ``text_config``."""

    @classmethod
    def condition(cls, hf_config: Any) -> bool:
        return (
            ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])
            or getattr(hf_config, "model_class", None) in SAT_MODEL_CLASSES
        )

    @classmethod
    def build(cls, hf_config: Any, model_path: Path) -> ModelConfig:
        if getattr(hf_config, "model_class", None) in SAT_MODEL_CLASSES:
            data = sat_to_hub(hf_config.to_dict(), Path(model_path))
        else:
            data = hf_config.to_dict()
            data.setdefault("checkpoint_layout", "hub")
        if not isinstance(data.get("vision_config"), dict):
            raise ConfigError(f"{model_path}: a CogVLM config needs a vision_config (the EVA2-CLIP tower)")
        config = RawConfig(data)
        config.model_type = "cogvlm2" if data.get("num_multi_query_heads") is not None else "cogvlm"
        try:
            settings = CogVLMSettings(config)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{model_path}: the CogVLM config lacks or mangles a field ({exc}); fix it") from None
        setattr(config, "text_config", _text_config(settings, data))  # noqa: B010 (RawConfig declares no such field)
        return build_model_config(model_path, config, torch_dtype=data.get("torch_dtype") or "bfloat16")


def _text_config(settings: CogVLMSettings, data: dict[str, Any]) -> Any:
    """The decoder's sizes as a LlamaConfig (the visual experts aside, it is a Llama)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_position_embeddings,
        rms_norm_eps=settings.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": settings.rope_theta},
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=data.get("eos_token_id"),
        pad_token_id=data.get("pad_token_id"),
        tie_word_embeddings=False,
    )


def sat_to_hub(sat: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """A SAT ``model_config.json`` (CogVLM 1) in the Hub's config.json naming."""
    try:
        eva = sat["eva_args"]
        image_size = eva["image_size"]
        image_size = image_size[0] if isinstance(image_size, list) else image_size
        hidden = sat["hidden_size"]
        vision = {
            "hidden_size": eva["hidden_size"],
            "num_heads": eva["num_attention_heads"],
            "num_hidden_layers": eva["num_layers"],
            "intermediate_size": eva["inner_hidden_size"],
            "patch_size": eva["patch_size"],
            "image_size": image_size,
            "in_channels": eva.get("in_channels", 3),
            "layer_norm_eps": eva.get("layernorm_epsilon", 1e-6),
            "hidden_act": "gelu",
            "num_positions": (image_size // eva["patch_size"]) ** 2 + eva.get("pre_len", 1),
        }
        if eva.get("use_final_layernorm"):
            raise ConfigError(
                f"{model_path / 'model_config.json'}: eva_args.use_final_layernorm is true, which CogVLM's tower "
                "does not have; this is not a CogVLM checkpoint vlm reads"
            )
        return {
            "architectures": [ARCHITECTURE],
            "checkpoint_layout": "sat",
            "hidden_size": hidden,
            "intermediate_size": sat["inner_hidden_size"],
            "num_hidden_layers": sat["num_layers"],
            "num_attention_heads": sat["num_attention_heads"],
            "vocab_size": sat["vocab_size"],
            "rms_norm_eps": sat.get("layernorm_epsilon", 1e-5),
            "max_position_embeddings": sat.get("max_sequence_length", 2048),
            "template_version": sat.get("template_version", "chat"),
            "bos_token_id": sat.get("bos_token_id", 1),
            "eos_token_id": sat.get("eos_token_id", 2),
            "pad_token_id": sat.get("pad_token_id", 0),
            "torch_dtype": sat.get("torch_dtype", "bfloat16"),
            "vision_config": vision,
        }
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"{model_path / 'model_config.json'} lacks {exc} (a SAT CogVLM config names num_layers, hidden_size, "
            "num_attention_heads, vocab_size, inner_hidden_size and eva_args); fix it"
        ) from None
