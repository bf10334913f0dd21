{%- set vision = cookiecutter.kind == "vision" -%}
{%- set C = cookiecutter.__class -%}
"""{{ C }} through vlm's conformance kit (vlm.testing.conformance), with greedy parity against an
independent reference implementation of the model, written below in plain torch{{ "\n(and transformers' Qwen2ForCausalLM for the language model)" if vision }}, and
{% if vision -%}
preprocessing parity against an independent reference processor, also written below (when the
family has a transformers processor, use that instead: ``"transformers:AutoProcessor"``).
{% else -%}
preprocessing parity against transformers' tokenizer and its chat template.
{% endif %}
The kit checks what every plugin must do: match claims our config and declines others', the
model builds in the dtype and on the device it is given, load_weights consumes every checkpoint
{% if vision -%}
tensor, odd images (1x1, 17x300, 1000x50, RGBA, L, ...) give as many placeholder tokens as
embed_images gives features and the reference processor's token ids and pixels, incremental
decoding with the KV cache equals a full forward, batching changes
{% else -%}
tensor, prompts give the reference tokenizer's token ids, incremental decoding with the KV cache
equals a full forward, batching changes
{% endif -%}
nothing, and vlm's greedy tokens and logits equal the reference's. Each failure says what to
change. The plugin must be installed (``pip install -e .``) so that vlm finds its entry point.
"""

from __future__ import annotations

import json
from pathlib import Path
{%- if not vision %}
from types import SimpleNamespace
{%- endif %}

{% if vision -%}
import numpy as np
{% endif -%}
import pytest
import torch
import torch.nn.functional as F

from vlm.testing.conformance import PluginConformanceTests


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    from {{ cookiecutter.__package }}.tiny_checkpoint import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "{{ cookiecutter.__model_type }}"))

{% if vision %}
class Reference(torch.nn.Module):
    """{{ C }} written independently of the plugin: the vision tower and projector in plain torch
    (patches by convolution, attention spelled out), the language model from transformers."""

    def __init__(self, config: dict, tensors: dict, language_model: torch.nn.Module):
        super().__init__()
        self.config, self.t, self.language_model = config, tensors, language_model

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> Reference:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        config = json.loads((Path(path) / "config.json").read_text())
        tensors = {k: v.to(dtype) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
        language_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config["text_config"]), dtype=dtype)
        prefix = "language_model."
        language_model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        return cls(config, tensors, language_model.eval())

    def layer_norm(self, x, name, eps):
        return F.layer_norm(x, x.shape[-1:], self.t[name + ".weight"], self.t[name + ".bias"], eps)

    def linear(self, x, name):
        return F.linear(x, self.t[name + ".weight"], self.t[name + ".bias"])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v, t = self.config["vision_config"], self.t
        d, p, heads, eps = v["hidden_size"], v["patch_size"], v["num_attention_heads"], v["layer_norm_eps"]
        weight = t["vision_tower.patch_embed.weight"].reshape(d, 3, p, p)
        x = F.conv2d(pixel_values, weight, t["vision_tower.patch_embed.bias"], stride=p)  # [B, D, g, g]
        b, _, g, _ = x.shape
        x = x.flatten(2).transpose(1, 2) + t["vision_tower.position_embedding"]
        for i in range(v["num_hidden_layers"]):
            name = f"vision_tower.layers.{i}"
            h = self.layer_norm(x, f"{name}.norm1", eps)
            q, k, w = (
                self.linear(h, f"{name}.attn.{n}").reshape(b, -1, heads, d // heads).transpose(1, 2)
                for n in ("q_proj", "k_proj", "v_proj")
            )
            scores = (q @ k.transpose(-1, -2)) / (d // heads) ** 0.5
            attended = (scores.softmax(-1) @ w).transpose(1, 2).reshape(b, -1, d)
            x = x + self.linear(attended, f"{name}.attn.out_proj")
            h = self.layer_norm(x, f"{name}.norm2", eps)
            x = x + self.linear(F.gelu(self.linear(h, f"{name}.mlp.fc1")), f"{name}.mlp.fc2")
        x = self.layer_norm(x, "vision_tower.post_layernorm", eps)
        m = v["merge_size"]
        x = x.reshape(b, g // m, m, g // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, m * m * d)
        return self.linear(F.gelu(self.linear(x, "projector.linear_1")), "projector.linear_2")

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.image_features(pixel_values)
            embeds[input_ids == self.config["image_token_id"]] = features.reshape(-1, features.shape[-1])
        return self.language_model(inputs_embeds=embeds)


class ReferenceProcessor:
    """{{ C }}'s preprocessing written independently of the plugin, transformers-style: the kit
    renders chat messages with ``apply_chat_template`` and calls the processor with the text and
    images; token ids must be equal and pixels within 1e-6 (a wrong resample filter, tile order
    or normalisation is far above that)."""

    def __init__(self, tokenizer, config: dict):
        vision = config["vision_config"]
        self.tokenizer = tokenizer
        self.size = vision["image_size"]
        self.tokens_per_image = (vision["image_size"] // vision["patch_size"] // vision.get("merge_size", 2)) ** 2

    @classmethod
    def from_pretrained(cls, path: str) -> ReferenceProcessor:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), json.loads((Path(path) / "config.json").read_text()))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def pixels(self, image) -> torch.Tensor:
        """RGB (transparency composited onto white), bicubic resize to size x size, then [-1, 1]."""
        from PIL import Image

        if "A" in image.getbands() or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1).float()

    def __call__(self, text: str, images=None, return_tensors="pt", add_special_tokens=True):
        text = text.replace("<image>", "<image>" * self.tokens_per_image)
        outputs = dict(self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors))
        if images:
            outputs["pixel_values"] = torch.stack([self.pixels(image) for image in images])
        return outputs
{% else %}
class Reference(torch.nn.Module):
    """{{ C }} written independently of the plugin, in plain torch: no fused weights, no KV cache,
    attention spelled out; the kit runs it over the prompt and the tokens vlm generated."""

    def __init__(self, config: dict, tensors: dict):
        super().__init__()
        self.config, self.t = config, tensors

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> Reference:
        from safetensors.torch import load_file

        config = json.loads((Path(path) / "config.json").read_text())
        tensors = {k: v.to(dtype) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
        return cls(config, tensors)

    def rms_norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config["rms_norm_eps"]) * self.t[name]

    def forward(self, input_ids: torch.Tensor):
        c, t = self.config, self.t
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        head_dim = c["hidden_size"] // heads
        x = t["model.embed_tokens.weight"][input_ids[0]]
        length = x.shape[0]
        inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(length).float(), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

        def rotate(v):  # rotary embedding, "rotate half" (neox) style
            half = v.shape[-1] // 2
            return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

        causal = torch.full((length, length), float("-inf")).triu(1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.rms_norm(x, p + "input_layernorm.weight")
            q = rotate((h @ t[p + "self_attn.q_proj.weight"].T).view(length, heads, head_dim))
            k = rotate((h @ t[p + "self_attn.k_proj.weight"].T).view(length, kv_heads, head_dim))
            v = (h @ t[p + "self_attn.v_proj.weight"].T).view(length, kv_heads, head_dim)
            k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
            scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5 + causal
            attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, -1)
            x = x + attended @ t[p + "self_attn.o_proj.weight"].T
            h = self.rms_norm(x, p + "post_attention_layernorm.weight")
            gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
        logits = self.rms_norm(x, "model.norm.weight") @ t["lm_head.weight"].T
        return SimpleNamespace(logits=logits[None])
{% endif %}

class Test{{ C }}Conformance(PluginConformanceTests):
    plugin = "{{ cookiecutter.__model_type }}"  # the entry-point name in pyproject.toml
    reference = Reference
{%- if vision %}
    reference_processor = ReferenceProcessor
{%- else %}
    reference_processor = "transformers:AutoTokenizer"  # text-only: token ids of prompts and chat messages
{%- endif %}
