"""Tiny random checkpoints written by transformers, and a byte-level tokenizer built offline.

Weights use a large ``initializer_range`` (0.3): at transformers' default (0.02) a random model's
greedy output degenerates into one repeated token, and token parity then proves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TINY_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def build_byte_tokenizer(extra_special_tokens: list[str] | None = None):
    """A byte-level BPE tokenizer (256 byte symbols, no merges) with ChatML special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        errors="replace",
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE: every byte is in the vocabulary
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    specials = SPECIAL_TOKENS + list(extra_special_tokens or [])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _text_config(model_type: str, vocab_size: int, **overrides: Any):
    from transformers import AutoConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def write_tiny_text_model(
    path: str | Path, model_type: str = "qwen2", seed: int = 0, dtype: str = "float32", **overrides: Any
) -> Path:
    """Write a tiny random ``model_type`` checkpoint plus tokenizer to ``path`` (transformers layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_byte_tokenizer()
    vocab_size = overrides.pop("vocab_size", 320)
    config = _text_config(model_type, vocab_size, **overrides)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
