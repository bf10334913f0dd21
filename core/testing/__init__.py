"""Helpers for testing vlm and its plugins without downloads: tiny checkpoints, local tokenizers,
and the plugin conformance kit (:mod:`vlm.testing.conformance`, imported on first use: it needs
pytest, and this package is imported by vlm's pytest plugin in every test session)."""

from __future__ import annotations

from typing import Any

from vlm.testing.checkpoints import TINY_TEXT_MODEL_TYPES, build_byte_tokenizer, write_tiny_text_model

_CONFORMANCE = ("Conformance", "ConformanceError", "PluginConformanceTests", "run_conformance")

__all__ = ["TINY_TEXT_MODEL_TYPES", "build_byte_tokenizer", "write_tiny_text_model", *_CONFORMANCE]


def __getattr__(name: str) -> Any:
    if name in _CONFORMANCE:
        from vlm.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module 'vlm.testing' has no attribute {name!r}")
