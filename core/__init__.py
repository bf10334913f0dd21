"""vlm: a plugin-first inference engine for vision-language models.

``from vlm import LLM, SamplingParams`` is the offline API. Imports are lazy so that
``import vlm`` (and ``vlmrun plugins``) never pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "vlm.llm",
    "RequestOutput": "vlm.outputs",
    "CompletionOutput": "vlm.outputs",
    "SamplingParams": "vlm.sampling_params",
    "EngineConfig": "vlm.config",
    "ModelConfig": "vlm.config",
}

if TYPE_CHECKING:
    from vlm.config import EngineConfig, ModelConfig
    from vlm.llm import LLM
    from vlm.outputs import CompletionOutput, RequestOutput
    from vlm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")
