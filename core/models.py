"""From a config to a built model: asking the plugins, then calling the chosen one.

VLM plugins call :func:`build_language_model` for their nested text config, so one LLM plugin
serves every VLM built on that LLM.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.config import ModelConfig
from vlm.plugins import get_registry


def choose_plugin(hf_config: Any, forced: str | None = None) -> str:
    plugin, _ = get_registry().choose(hf_config, forced)
    return plugin


def build_model(
    model_config: ModelConfig, dtype: torch.dtype, device: torch.device, plugin: str | None = None
) -> tuple[torch.nn.Module, str]:
    """Build (not load) the model of ``model_config`` with the plugin that claims it."""
    registry = get_registry()
    name = choose_plugin(model_config.hf_config, plugin)
    model = registry.call(
        name, "build_model", hf_config=model_config.hf_config, model_config=model_config, dtype=dtype, device=device
    )
    return model, name


def build_language_model(text_config: Any, model_config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The language model for a VLM's nested text config, from whichever plugin claims it."""
    registry = get_registry()
    name = choose_plugin(text_config)
    return registry.call(name, "build_model", hf_config=text_config, model_config=model_config, dtype=dtype, device=device)


def build_preprocessor(model_config: ModelConfig, tokenizer: Any, plugin: str) -> Any:
    return get_registry().call(
        plugin,
        "build_preprocessor",
        hf_config=model_config.hf_config,
        model_config=model_config,
        model_path=model_config.path,
        tokenizer=tokenizer,
    )
