"""A plain-torch CogVLM / CogVLM2, written from the published description and code (THUDM's
``modeling_cogvlm.py`` and ``visual.py``), as the oracle of the plugin's tests: no paged cache, no
``vlm`` code, one forward over the whole sequence, the Hub layout's tensor names.

``CogVLMReference.from_pretrained(path)(input_ids=[1, T], images=[1, 3, S, S], token_type_ids=[1, P])``
returns an object with ``.logits`` ``[1, T, vocab]``. ``token_type_ids`` (1 at image tokens) covers
the prompt; tokens after it are text, as the original's generation appends them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

LANGUAGE, VISION = 0, 1


def build_position_ids(token_types: torch.Tensor) -> torch.Tensor:
    """``[T]`` types -> ``[T]`` positions: boi and eoi (the first and last token of an image run)
    count as text; text counts up by one, and so does the first inner image token, which every
    other inner image token shares."""
    types = token_types.clone()
    first = (types == VISION) & torch.cat([torch.tensor([True]), types[:-1] == LANGUAGE])
    last = (types == VISION) & torch.cat([types[1:] == LANGUAGE, torch.tensor([True])])
    types[first | last] = LANGUAGE
    step = torch.zeros_like(types)
    step[1:] = ((types[1:] == LANGUAGE) | ((types[1:] == VISION) & (types[:-1] == LANGUAGE))).long()
    return step.cumsum(0)


def vision_expert_mask(token_types: torch.Tensor) -> torch.Tensor:
    """A token takes the vision expert when it and the next token are image tokens."""
    mask = torch.zeros_like(token_types, dtype=torch.bool)
    mask[:-1] = (token_types[:-1] == VISION) & (token_types[1:] == VISION)
    return mask


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def expert_linear(x: torch.Tensor, mask: torch.Tensor, language: nn.Linear, vision: nn.Linear) -> torch.Tensor:
    """``language`` for text tokens, ``vision`` where the expert mask is set."""
    out = x.new_zeros(*x.shape[:-1], language.out_features)
    out[~mask] = language(x[~mask])
    out[mask] = vision(x[mask])
    return out


class Weight(nn.Module):
    """A module that holds just ``weight`` (RMSNorm's, as the checkpoint names it)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.language_mlp = MLP(hidden, inter)
        self.vision_mlp = MLP(hidden, inter)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[~mask] = self.language_mlp(x[~mask])
        out[mask] = self.vision_mlp(x[mask])
        return out


class VisionExpertAttention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.hidden // c.heads
        qkv = c.hidden + 2 * self.kv_heads * self.head_dim
        self.vision_expert_query_key_value = nn.Linear(c.hidden, qkv, bias=True)
        self.vision_expert_dense = nn.Linear(c.hidden, c.hidden, bias=False)
        self.language_expert_query_key_value = nn.Linear(c.hidden, qkv, bias=False)
        self.language_expert_dense = nn.Linear(c.hidden, c.hidden, bias=False)
        self.rope_theta = c.rope_theta

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = expert_linear(x, mask, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        q, k, v = qkv.split([self.heads * self.head_dim, *(2 * [self.kv_heads * self.head_dim])], -1)
        q = q.view(t, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(t, self.kv_heads, self.head_dim).transpose(0, 1)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        angles = positions.float()[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        out = out.transpose(0, 1).reshape(t, -1)
        return expert_linear(out, mask, self.language_expert_dense, self.vision_expert_dense)


class DecoderLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.eps = c.eps
        self.input_layernorm = Weight(c.hidden)
        self.post_attention_layernorm = Weight(c.hidden)
        self.self_attn = VisionExpertAttention(c)
        self.mlp = VisionExpertMLP(c.hidden, c.inter)

    def forward(self, x, mask, positions):
        x = x + self.self_attn(rms_norm(x, self.input_layernorm.weight, self.eps), mask, positions)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm.weight, self.eps), mask)


class EVAAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)


class EVAMLP(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.fc1 = nn.Linear(d, inter)
        self.fc2 = nn.Linear(inter, d)


class EVALayer(nn.Module):
    """EVA2-CLIP's post-norm block: LayerNorm on the attention and MLP outputs, inside the residual."""

    def __init__(self, v: dict):
        super().__init__()
        d, eps = v["hidden_size"], v["layer_norm_eps"]
        self.heads = v["num_heads"]
        self.input_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention = EVAAttention(d)
        self.mlp = EVAMLP(d, v["intermediate_size"])
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.attention.query_key_value(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, -1)
        x = x + self.input_layernorm(self.attention.dense(attended))
        return x + self.post_attention_layernorm(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class PatchEmbedding(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        d = v["hidden_size"]
        self.proj = nn.Conv2d(v["in_channels"], d, v["patch_size"], stride=v["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, d))
        self.position_embedding = nn.Embedding(v["num_positions"], d)


class EVATransformer(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        self.layers = nn.ModuleList(EVALayer(v) for _ in range(v["num_hidden_layers"]))


class GLU(nn.Module):
    def __init__(self, in_features: int, hidden: int, inter: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, inter, bias=False)
        self.dense_4h_to_h = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIP(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        v = c.vision
        d = v["hidden_size"]
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = EVATransformer(v)
        self.cogvlm2 = c.cogvlm2
        if c.cogvlm2:
            self.conv = nn.Conv2d(d, c.hidden, kernel_size=2, stride=2)
        self.linear_proj = GLU(c.hidden if c.cogvlm2 else d, c.hidden, c.inter)
        self.boi = nn.Parameter(torch.zeros(1, 1, c.hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, c.hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.patch_embedding.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.patch_embedding.position_embedding.weight[None]
        for layer in self.transformer.layers:
            x = layer(x)
        x = x[:, 1:]
        if self.cogvlm2:
            side = int(x.shape[1] ** 0.5)
            x = self.conv(x.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat([self.boi.expand(x.shape[0], -1, -1), x, self.eoi.expand(x.shape[0], -1, -1)], dim=1)


class Decoder(nn.Module):
    def __init__(self, c: SimpleNamespace, vocab_size: int, num_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, c.hidden)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(num_layers))
        self.norm = Weight(c.hidden)
        self.vision = EVA2CLIP(c)


class CogVLMReference(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cogvlm2 = "num_multi_query_heads" in config
        c = SimpleNamespace(
            hidden=config["hidden_size"],
            inter=config["intermediate_size"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_multi_query_heads", config["num_attention_heads"]),
            eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=500000.0 if cogvlm2 else 10000.0,
            cogvlm2=cogvlm2,
            vision=config["vision_config"],
        )
        self.eps = c.eps
        self.model = Decoder(c, config["vocab_size"], config["num_hidden_layers"])
        self.lm_head = nn.Linear(c.hidden, config["vocab_size"], bias=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> CogVLMReference:
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return model.to(dtype).eval()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, token_type_ids=None):
        ids = input_ids[0]
        types = torch.full_like(ids, LANGUAGE)
        if token_type_ids is not None:
            prompt_types = torch.as_tensor(token_type_ids).reshape(-1)
            types[: len(prompt_types)] = prompt_types
        x = self.model.embed_tokens(ids)
        if images is not None:
            x = x.clone()
            x[types == VISION] = self.model.vision(images.to(x.dtype)).reshape(-1, x.shape[-1])
        positions, mask = build_position_ids(types), vision_expert_mask(types)
        for layer in self.model.layers:
            x = layer(x, mask, positions)
        logits = self.lm_head(rms_norm(x, self.model.norm.weight, self.eps)).float()
        return SimpleNamespace(logits=logits[None], hidden_states=x[None])


def reference_inputs(inputs) -> dict:
    """The reference's extra arguments for a ``ModelInputs`` (the conformance kit's ``reference_inputs``):
    the picture, and the prompt's token types (1 at the image placeholders)."""
    if not inputs.images:
        return {}
    types = [VISION if t == inputs.image_token_id else LANGUAGE for t in inputs.token_ids]
    return {
        "images": torch.cat([image.pixel_values for image in inputs.images]),
        "token_type_ids": torch.tensor([types]),
    }
