"""Helpers for testing vlm and its plugins without downloads: tiny checkpoints, local tokenizers."""

from vlm.testing.checkpoints import TINY_TEXT_MODEL_TYPES, build_byte_tokenizer, write_tiny_text_model

__all__ = ["TINY_TEXT_MODEL_TYPES", "build_byte_tokenizer", "write_tiny_text_model"]
