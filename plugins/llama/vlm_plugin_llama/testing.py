"""A tiny InternLM2 checkpoint made by re-packing a tiny random Llama one.

transformers has no InternLM2 class and vlm never runs model-repo code, so InternLM2 support is
proven by equivalence: InternLM2 is Llama with other tensor names and a grouped q/k/v tensor.
The same weights, re-packed into the InternLM2 layout, must give the Llama model's outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from vlm.testing.checkpoints import write_tiny_text_model

#: Llama checkpoint name piece -> InternLM2 name piece (q/k/v are packed into wqkv separately)
_RENAMES = {
    "model.embed_tokens.": "model.tok_embeddings.",
    "lm_head.": "output.",
    ".self_attn.o_proj.": ".attention.wo.",
    ".mlp.gate_proj.": ".feed_forward.w1.",
    ".mlp.up_proj.": ".feed_forward.w3.",
    ".mlp.down_proj.": ".feed_forward.w2.",
    ".input_layernorm.": ".attention_norm.",
    ".post_attention_layernorm.": ".ffn_norm.",
}


def pack_wqkv(q, k, v, num_kv_heads: int):
    """Full q, k, v (weights ``[heads * head_dim, hidden]`` or biases) -> InternLM2's grouped wqkv:
    for each kv head, its q heads, then its k head, then its v head."""
    import torch

    rest = tuple(q.shape[1:])
    head_dim = k.shape[0] // num_kv_heads
    q = q.reshape(num_kv_heads, -1, head_dim, *rest)  # [kv, q_per_kv, head_dim, ...]
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def repack_llama_as_internlm2(llama_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``llama_dir``'s checkpoint (single safetensors file) in the InternLM2 layout."""
    from safetensors.torch import load_file, save_file

    llama_dir, out_dir = Path(llama_dir), Path(out_dir)
    config = json.loads((llama_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise ValueError("InternLM2 needs head_dim == hidden_size // num_attention_heads")
    if config.get("mlp_bias"):
        raise ValueError("InternLM2 has no MLP bias")
    tensors = load_file(str(llama_dir / "model.safetensors"))
    packed = {}
    for name, tensor in tensors.items():
        if ".self_attn.q_proj." in name:
            k = tensors[name.replace("q_proj", "k_proj")]
            v = tensors[name.replace("q_proj", "v_proj")]
            packed[name.replace("self_attn.q_proj", "attention.wqkv")] = pack_wqkv(tensor, k, v, kv_heads)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            for old, new in _RENAMES.items():
                if name.startswith(old) or (old.startswith(".") and old in name):
                    name = name.replace(old, new, 1)
            packed[name] = tensor.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    rope = config.get("rope_parameters") or {}
    internlm2 = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        # real checkpoints point at their own modeling code; vlm never runs it
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config["max_position_embeddings"],
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        "rope_scaling": None,
        "bias": bool(config.get("attention_bias", False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "initializer_range": config.get("initializer_range", 0.02),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "attn_implementation": "eager",
        "torch_dtype": config.get("dtype") or config.get("torch_dtype") or "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(internlm2, indent=2) + "\n")
    for file in llama_dir.iterdir():  # tokenizer files, chat template, generation_config.json
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model.safetensors"):
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def _randomize_biases(file: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(file))
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.3
    save_file(tensors, str(file), metadata={"format": "pt"})


def write_tiny_internlm2(path: str | Path, seed: int = 0, **overrides: Any) -> tuple[Path, Path]:
    """A tiny random Llama checkpoint and the same weights in the InternLM2 layout.

    Defaults: 4 attention heads over 2 kv heads, so the wqkv grouping matters.
    ``attention_bias=True`` gives q/k/v/o biases (InternLM2's ``bias: true``), drawn at random
    here (transformers initialises biases to zero, which would prove nothing).

    :return: ``(internlm2_dir, llama_dir)``, subdirectories of ``path``.
    """
    path = Path(path)
    overrides = {"num_attention_heads": 4, "num_key_value_heads": 2, **overrides}
    llama_dir = write_tiny_text_model(path / "llama", "llama", seed=seed, **overrides)
    if overrides.get("attention_bias"):
        _randomize_biases(llama_dir / "model.safetensors", seed)
    return repack_llama_as_internlm2(llama_dir, path / "internlm2"), llama_dir
