"""Validated configuration: the model's config.json (ModelConfig) and engine settings (EngineConfig).

config.json is read by ``transformers.AutoConfig`` when transformers knows the ``model_type``
(never with remote code), and as raw JSON (:class:`RawConfig`) otherwise, e.g. the original
OpenGVLab InternVL layout. Either way plugins get attribute access, and the core validates the
fields it depends on so that a broken config is a one-line error naming the field.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from vlm.errors import ConfigError, reason


def one_line(
    exc: ValidationError, what: str, fields: Iterable[str] = (), flags: Mapping[str, str] | None = None
) -> str:
    """A pydantic error as one line: ``<what> 'field': message (got value)``.

    :param fields: the model's field names, to suggest the intended one for a misspelled field.
    :param flags: field -> the command-line flag that sets it, named after the field.
    """
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"]
        if err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or not field else f" (got {got!r})"
        hint = ""
        if err["type"] == "extra_forbidden":
            message = "unknown field"
            close = difflib.get_close_matches(str(err["loc"][-1]), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        # a check across fields has no location; its message names the fields involved
        flag = f" ({flags[field]})" if flags and field in flags else ""
        parts.append(f"{what} {field!r}{flag}: {message}{got_text}{hint}" if field else message)
    return "; ".join(parts)


class Settings(BaseModel):
    """Base for user-facing settings: unknown fields and bad values are one-line errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # a ClassVar, not a pydantic private attribute: private attributes do not exist yet on an
    # instance whose validation failed, which is exactly when the error message needs this
    _what: ClassVar[str] = "setting"
    #: field -> the command-line flag that sets it (named in errors)
    _flags: ClassVar[dict[str, str]] = {}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(one_line(exc, type(self)._what, type(self).model_fields, type(self)._flags)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(one_line(exc, type(self)._what, type(self).model_fields, type(self)._flags)) from None


class RawConfig:
    """Attribute access over a config.json that transformers does not know."""

    architectures: list[str] | None
    model_type: str | None

    def __init__(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            setattr(self, key, RawConfig(value) if isinstance(value, dict) else value)
        self.__dict__.setdefault("architectures", None)
        self.__dict__.setdefault("model_type", None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in self.__dict__.items()}

    def get_text_config(self, **_: Any) -> Any:
        for name in ("text_config", "llm_config", "language_config"):
            nested = getattr(self, name, None)
            if nested is not None:
                return nested
        return self

    def __repr__(self) -> str:
        return f"RawConfig(model_type={self.model_type!r}, architectures={self.architectures!r})"


class TextModelConfig(BaseModel):
    """The language-model fields the core relies on (the nested text config for a VLM)."""

    model_config = ConfigDict(extra="ignore")

    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    head_dim: PositiveInt = Field(None, validate_default=False)  # type: ignore[assignment]  # set below
    max_position_embeddings: PositiveInt = 4096

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if data.get("num_key_value_heads") is None:
            data["num_key_value_heads"] = data.get("num_attention_heads")
        for key in ("head_dim", "max_position_embeddings"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> TextModelConfig:
        # runs only once every field is valid, so a bad num_attention_heads is reported alone
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"head_dim is not set and hidden_size ({self.hidden_size}) is not a multiple of "
                    f"num_attention_heads ({self.num_attention_heads}); set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        return self


class ModelConfig(BaseModel):
    """A model directory's validated config.json."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    path: str
    model_type: str | None
    architectures: list[str]
    torch_dtype: str | None = Field(description="the checkpoint's dtype as declared in config.json")
    text: TextModelConfig
    is_multimodal: bool
    config_builder: str | None = Field(None, description="the plugin's ConfigBuilder that read config.json, if any")
    hf_config: Any = Field(exclude=True, repr=False)

    def summary(self) -> dict[str, Any]:
        return self.model_dump(exclude={"hf_config"})


#: where a SwissArmyTransformer (SAT) checkpoint keeps its config (``model_class``, ``num_layers``, ...);
#: read when there is no config.json, for a plugin's config builder to translate
SAT_CONFIG_FILE = "model_config.json"


def read_config_json(model_dir: Path) -> dict[str, Any]:
    config_file = model_dir / "config.json"
    if not config_file.is_file() and (model_dir / SAT_CONFIG_FILE).is_file():
        config_file = model_dir / SAT_CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"no config.json in {model_dir}; a model directory in Hugging Face layout needs one")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_file} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file} must hold a JSON object, not a {type(raw).__name__}; fix or re-download it")
    if not raw.get("model_type") and not raw.get("architectures") and not raw.get("model_class"):
        raise ConfigError(
            f"{config_file} has neither 'model_type' nor 'architectures'; add the one your checkpoint was saved with"
        )
    return raw


def load_hf_config(model_dir: Path, raw: dict[str, Any]) -> Any:
    """transformers' config class when it knows ``model_type``, else :class:`RawConfig`."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        config = RawConfig(raw)
        # a wrapper transformers does not know (e.g. the original InternVL layout) may still nest a
        # language model it does know: give that one transformers' class, with its defaults
        for name in ("llm_config", "text_config", "language_config"):
            nested = raw.get(name)
            if isinstance(nested, dict) and nested.get("model_type") in CONFIG_MAPPING:
                try:
                    setattr(config, name, AutoConfig.for_model(**nested))
                except Exception as exc:
                    raise ConfigError(f"{model_dir / 'config.json'}: {name}: {reason(exc)}") from None
        return config
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers validates some fields itself
        raise ConfigError(f"{model_dir / 'config.json'}: {reason(exc)}") from None


def text_config_of(hf_config: Any) -> Any:
    if hasattr(hf_config, "get_text_config"):
        return hf_config.get_text_config()
    return hf_config


def composite_text_config(hf_config: Any) -> Any:
    """A VLM's nested text config as its language model must be built: with the LM head tied (or
    not) by the composite config's top-level ``tie_word_embeddings``, as transformers ties it."""
    text_config = copy.copy(text_config_of(hf_config))
    text_config.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
    return text_config


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, RawConfig):
        return config.to_dict()
    data = config.to_dict()
    # transformers keeps some derived attributes (e.g. head_dim) off to_dict()
    for key in ("head_dim", "num_key_value_heads", "max_position_embeddings"):
        if data.get(key) is None and getattr(config, key, None) is not None:
            data[key] = getattr(config, key)
    return data


class ConfigBuilder:
    """Turns a config.json in a plugin's own naming into vlm's :class:`ModelConfig` (lmdeploy's
    ``ConfigBuilder``). Register a subclass in ``vlm.registry.CONFIG_BUILDERS`` (a plugin's child
    scope); the core asks every builder's :meth:`condition` before it validates the text config,
    and the first that claims the config builds it.

    Typical ``build``: translate the fields into a transformers config the language-model plugin
    already serves, and return :func:`build_model_config` of it; every plugin then sees that
    config (``match``, ``build_model``), and the checkpoint's weights load unchanged.
    """

    @classmethod
    def condition(cls, hf_config: Any) -> bool:
        """Whether this builder understands ``hf_config`` (what config.json was read as)."""
        raise NotImplementedError

    @classmethod
    def build(cls, hf_config: Any, model_path: Path) -> ModelConfig:
        """vlm's config for the model in ``model_path``."""
        raise NotImplementedError


def build_model_config(
    model_path: str | Path,
    hf_config: Any,
    torch_dtype: str | None = None,
    where: str | None = None,
) -> ModelConfig:
    """Validate ``hf_config`` (its nested text config for a VLM) into a :class:`ModelConfig`;
    a missing or bad field is a one-line :class:`ConfigError` naming it."""
    model_path = Path(model_path)
    text_config = text_config_of(hf_config)
    text_dict = _config_dict(text_config)
    where = where or f"{model_path / 'config.json'}:" + (" text config" if text_config is not hf_config else "")
    try:
        text = TextModelConfig.model_validate(text_dict)
    except ValidationError as exc:
        raise ConfigError(f"{where} {one_line(exc, 'field')}; fix config.json") from None
    dtype = torch_dtype or text_dict.get("torch_dtype") or text_dict.get("dtype")
    return ModelConfig(
        path=str(model_path),
        model_type=getattr(hf_config, "model_type", None),
        architectures=list(getattr(hf_config, "architectures", None) or []),
        torch_dtype=str(dtype).replace("torch.", "") if dtype else None,
        text=text,
        is_multimodal=text_config is not hf_config,
        hf_config=hf_config,
    )


def config_builders() -> list[type[ConfigBuilder]]:
    """Every registered config builder (the plugins are loaded first: they register theirs)."""
    from vlm.plugin.manager import get_registry
    from vlm.registry import CONFIG_BUILDERS, Registry

    get_registry()
    found: list[type[ConfigBuilder]] = []
    pending: list[Registry] = [CONFIG_BUILDERS]
    while pending:
        registry = pending.pop(0)
        for name in list(registry.module_dict):
            builder = registry.get(f"{registry.scope}.{name}")
            if builder not in found:  # aliases name one builder twice
                found.append(builder)
        pending += list(registry.children.values())
    return found


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``model_dir/config.json``; raises :class:`ConfigError` in one line.

    A plugin's :class:`ConfigBuilder` that claims the config builds it; otherwise transformers'
    config class (or the raw JSON) must name the fields of :class:`TextModelConfig`.
    """
    model_dir = Path(model_dir)
    raw = read_config_json(model_dir)
    hf_config = load_hf_config(model_dir, raw)
    for builder in config_builders():
        if builder.condition(hf_config):
            config = builder.build(hf_config, model_dir)
            if not isinstance(config, ModelConfig):
                raise ConfigError(
                    f"config builder {builder.__qualname__} returned {type(config).__name__}, not a ModelConfig; "
                    "return vlm.plugin.build_model_config(...)"
                )
            return config.model_copy(update={"config_builder": f"{builder.__module__}.{builder.__qualname__}"})
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    try:
        return build_model_config(model_dir, hf_config, torch_dtype=str(dtype) if dtype else None)
    except ConfigError as exc:
        if isinstance(hf_config, RawConfig):  # transformers does not know this model_type either
            raise ConfigError(
                f"{exc}, or install a plugin whose config builder reads model_type={raw.get('model_type')!r} "
                "(transformers has no config class for it)"
            ) from None
        raise


class EngineConfig(Settings):
    """How the engine runs a model. Every field is also a ``vlmrun`` flag."""

    _what = "engine setting"

    model: str = Field(description="model directory, or a hub id already in the local HF cache")
    plugin: str | None = Field(None, description="force this plugin instead of asking `match`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: the checkpoint's bf16/fp16 where the CPU computes it natively (else float32) on CPU; "
        "the checkpoint's dtype on GPU",
    )
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    max_model_len: PositiveInt | None = Field(
        None, description="prompt + generated tokens per sequence; default: the config's limit"
    )
    max_num_seqs: PositiveInt = Field(64, description="sequences decoded together per step")
    max_num_batched_tokens: PositiveInt | None = Field(
        None,
        description="tokens in one forward step (long prompts are prefilled in chunks); default: 512 on CPU, "
        "where larger steps overflow the caches (prefill ~30% slower at 2048), 2048 on GPU",
    )
    block_size: PositiveInt = Field(16, description="tokens per KV-cache block")
    kv_cache_gib: float = Field(2.0, gt=0, description="memory budget for the KV cache")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prefixes already computed")
    num_threads: PositiveInt | None = Field(None, description="CPU threads; default: all cores (shared between ranks)")
    tensor_parallel_size: PositiveInt = Field(
        1, description="shard the model over this many processes on this machine (CPU, gloo); rank 0 serves"
    )
    seed: int = Field(0, description="default seed for sampling")
    allow_download: bool = Field(False, description="download a hub id that is not cached")
    quantization: Literal["int8", "int4", "w8a8"] | None = Field(
        None,
        description="quantization of the language model's linear layers, on the fly: weight-only int8 (per output "
        "channel) or int4 (group-wise, with zero points), or w8a8 (int8's weights, each token's activations in int8 "
        "too: the CPU's integer dot products)",
    )
    quantization_group_size: Literal[32, 64, 128] = Field(
        128, description="int4: input features per scale and zero point"
    )
    quantize_vision: bool = Field(False, description="quantize the vision tower and projector too")
    quantize_lm_head: bool = Field(
        True, description="with quantization: the LM head too, int8 per vocabulary row whatever the scheme"
    )
    min_pixels: PositiveInt | None = Field(
        None,
        description="image budget: pictures smaller than this (width x height) are enlarged, for families with a "
        "pixel budget (Qwen2-VL); default: the model's preprocessor_config.json",
    )
    max_pixels: PositiveInt | None = Field(
        None,
        description="image budget: pictures larger than this are shrunk, so an image costs at most about "
        "max_pixels / 784 tokens on Qwen2-VL; default: the model's preprocessor_config.json",
    )
    max_num_tiles: PositiveInt | None = Field(
        None,
        description="image budget for tiling families (InternVL): at most this many tiles per picture, plus a "
        "thumbnail when there are several; default: the checkpoint's max_patches / max_dynamic_patch",
    )

    _flags: ClassVar[dict[str, str]] = {
        "max_model_len": "--max-model-len",
        "max_num_seqs": "--max-num-seqs",
        "max_num_batched_tokens": "--max-num-batched-tokens",
        "kv_cache_gib": "--kv-cache-gib",
        "num_threads": "--threads",
        "tensor_parallel_size": "--tp",
        "quantization": "--quantize",
        "quantization_group_size": "--quantization-group-size",
        "device": "--device",
        "dtype": "--dtype",
        "seed": "--seed",
        "min_pixels": "--min-pixels",
        "max_pixels": "--max-pixels",
        "max_num_tiles": "--max-num-tiles",
    }

    @model_validator(mode="after")
    def _pixel_budget_in_order(self) -> EngineConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"--min-pixels ({self.min_pixels}) exceeds --max-pixels ({self.max_pixels}); lower or raise one"
            )
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|(cuda|xpu)(:\d+)?|mps", value):
            raise ValueError("is not a device vlm runs on; use auto, cpu, cuda or cuda:N")
        return value
