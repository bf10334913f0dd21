{%- set vision = cookiecutter.kind == "vision" -%}
{%- set C = cookiecutter.__class -%}
"""Write a tiny random {{ C }} checkpoint for tests: config.json, model.safetensors, tokenizer.

    python -m {{ cookiecutter.__package }}.tiny_checkpoint OUT_DIR

A real checkpoint comes from the model's authors; this one has the same layout (tensor names and
config fields) with a few small layers and seeded random weights, so that tests run in seconds
without downloads. The tensor names below *are* the checkpoint format that ``load_weights``
maps; change them together with the model when you adapt this plugin to a real family.

Random weights use a large scale (normal, std 0.3 for the language model; norm weights around
1): at the usual 0.02 a random model's greedy output is one token repeated, and parity tests on
it prove little. The tokenizer is vlm.testing's byte-level tokenizer, built offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
{% if vision %}
IMAGE_TOKEN = "<image>"

#: ChatML; an image part becomes one IMAGE_TOKEN placeholder (the preprocessor expands it).
CHAT_TEMPLATE = (
{%- raw %}
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
{%- endraw %}
)

VISION_CONFIG = dict(
    image_size=32, patch_size=8, merge_size=2, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=2, layer_norm_eps=1e-5,
)
{% endif %}
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
)
VOCAB_SIZE = 320  # the byte tokenizer's 256 bytes + special tokens, rounded up


def build_tokenizer():
    from vlm.testing import build_byte_tokenizer
{% if vision %}
    tokenizer = build_byte_tokenizer(extra_special_tokens=[IMAGE_TOKEN])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
{%- else %}
    return build_byte_tokenizer()
{%- endif %}

{% if vision %}
def tiny_config(tokenizer: Any) -> dict[str, Any]:
    """config.json: our own model_type, a vision config, and a Qwen2 text config (served by
    vlm-plugin-llama: vlm asks every plugin to match the nested text config)."""
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_config = dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=VOCAB_SIZE,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **TEXT_CONFIG,
    )
    return {
        "architectures": ["{{ cookiecutter.architectures.split(',')[0].strip() }}"],
        "model_type": "{{ cookiecutter.__model_type }}",
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_config": dict(VISION_CONFIG),
        "text_config": text_config,
        "torch_dtype": "float32",
    }


def checkpoint_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """name -> tensor for the whole model: our vision tower and projector, and the language model
    as transformers' Qwen2ForCausalLM stores it, under ``language_model.``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def small(*shape: int) -> torch.Tensor:  # biases, position embeddings
        return 0.2 * torch.randn(*shape, generator=generator)

    def norm(size: int) -> torch.Tensor:  # around 1, so that mixing up two norms changes outputs
        return 1.0 + 0.2 * torch.randn(size, generator=generator)

    v = config["vision_config"]
    d, p, inter = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    hidden = config["text_config"]["hidden_size"]
    tensors = {
        "vision_tower.patch_embed.weight": linear(d, 3 * p * p),
        "vision_tower.patch_embed.bias": small(d),
        "vision_tower.position_embedding": small((v["image_size"] // p) ** 2, d),
    }
    for i in range(v["num_hidden_layers"]):
        prefix = f"vision_tower.layers.{i}."
        for name in ("norm1", "norm2"):
            tensors[prefix + f"{name}.weight"], tensors[prefix + f"{name}.bias"] = norm(d), small(d)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[prefix + f"attn.{name}.weight"], tensors[prefix + f"attn.{name}.bias"] = linear(d, d), small(d)
        tensors[prefix + "mlp.fc1.weight"], tensors[prefix + "mlp.fc1.bias"] = linear(inter, d), small(inter)
        tensors[prefix + "mlp.fc2.weight"], tensors[prefix + "mlp.fc2.bias"] = linear(d, inter), small(d)
    tensors["vision_tower.post_layernorm.weight"], tensors["vision_tower.post_layernorm.bias"] = norm(d), small(d)
    merged = v["merge_size"] ** 2 * d
    tensors["projector.linear_1.weight"], tensors["projector.linear_1.bias"] = linear(hidden, merged), small(hidden)
    tensors["projector.linear_2.weight"], tensors["projector.linear_2.bias"] = linear(hidden, hidden), small(hidden)

    text_config = AutoConfig.for_model(**config["text_config"], initializer_range=0.3)
    torch.manual_seed(seed)
    language_model = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32)
    for name, tensor in language_model.state_dict().items():
        tensors["language_model." + name] = tensor
    return {name: tensor.contiguous() for name, tensor in tensors.items()}
{%- else %}
def tiny_config(tokenizer: Any) -> dict[str, Any]:
    """config.json: our own model_type (transformers does not know it; vlm reads it as is)."""
    return {
        "architectures": ["{{ cookiecutter.architectures.split(',')[0].strip() }}"],
        "model_type": "{{ cookiecutter.__model_type }}",
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "torch_dtype": "float32",
        **TEXT_CONFIG,
    }


def checkpoint_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """name -> tensor, in the Hugging Face Llama layout (q/k/v and gate/up stored apart)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(*shape, generator=generator)

    def norm(size: int) -> torch.Tensor:  # around 1, so that mixing up two norms changes outputs
        return 1.0 + 0.2 * torch.randn(size, generator=generator)

    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_size, kv_size = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = norm(hidden)
        tensors[prefix + "self_attn.q_proj.weight"] = normal(q_size, hidden)
        tensors[prefix + "self_attn.k_proj.weight"] = normal(kv_size, hidden)
        tensors[prefix + "self_attn.v_proj.weight"] = normal(kv_size, hidden)
        tensors[prefix + "self_attn.o_proj.weight"] = normal(hidden, q_size)
        tensors[prefix + "post_attention_layernorm.weight"] = norm(hidden)
        tensors[prefix + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    return tensors
{%- endif %}


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``path`` (created if needed); returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    save_file(checkpoint_tensors(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    tokenizer.save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m {{ cookiecutter.__package }}.tiny_checkpoint OUT_DIR", file=sys.stderr)
        return 2
    print(write_tiny_checkpoint(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
