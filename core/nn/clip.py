"""CLIP and SigLIP vision towers (the transformer before any pooling head), shared by VLM families.

Registered in ``vlm.registry.VISION_TOWERS`` as ``CLIPVisionTower`` and ``SiglipVisionTower`` (one
class: ``vision_config.model_type`` says which). Module names follow transformers' vision models
(``embeddings.patch_embedding``, ``pre_layrnorm``, ``encoder.layers.N.self_attn.qkv_proj`` ...), so
a plugin maps checkpoint names with prefixes only; q, k and v load into one fused projection.

The tower returns hidden states, not a pooled output: ``feature_layers`` says which (0 is the
embeddings after ``pre_layrnorm``, ``i > 0`` the output of layer ``i``); their states are
concatenated on the last dimension. Layers after the deepest one read are not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from vlm.nn.activation import get_act_fn
from vlm.nn.attention import VisionAttention
from vlm.nn.linear import build_qkv_proj, build_replicated_linear
from vlm.nn.norm import LayerNorm
from vlm.nn.patch_embedding import ConvPatchEmbedding

#: vision_config.model_type -> does the tower have a class token and a LayerNorm before the encoder?
CLASS_TOKEN = {"clip_vision_model": True, "siglip_vision_model": False}


class TowerSettings:
    def __init__(self, vision_config: Any):
        self.model_type = getattr(vision_config, "model_type", None)
        if self.model_type not in CLASS_TOKEN:
            raise ValueError(
                f"vision_config.model_type is {self.model_type!r}; CLIPVisionTower builds {' and '.join(CLASS_TOKEN)}"
            )
        self.class_token = CLASS_TOKEN[self.model_type]
        self.hidden_size = vision_config.hidden_size
        self.num_heads = vision_config.num_attention_heads
        self.intermediate_size = vision_config.intermediate_size
        self.num_layers = vision_config.num_hidden_layers
        self.image_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.eps = vision_config.layer_norm_eps
        self.hidden_act = vision_config.hidden_act  # CLIP: quick_gelu, SigLIP: gelu_pytorch_tanh
        self.grid = self.image_size // self.patch_size


class VisionEmbeddings(nn.Module):
    """Patches (+ class token) + learned positions."""

    def __init__(self, s: TowerSettings, dtype, device):
        super().__init__()
        if s.class_token:
            self.class_embedding = nn.Parameter(
                torch.empty(s.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        # CLIP's patch convolution has no bias, SigLIP's has one
        self.patch_embedding = ConvPatchEmbedding(
            3, s.hidden_size, s.patch_size, bias=not s.class_token, dtype=dtype, device=device
        )
        positions = s.grid * s.grid + int(s.class_token)
        self.position_embedding = nn.Embedding(positions, s.hidden_size, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionSelfAttention(nn.Module):
    def __init__(self, s: TowerSettings, dtype, device):
        super().__init__()
        head_dim = s.hidden_size // s.num_heads
        self.qkv_proj = build_qkv_proj(
            s.hidden_size, head_dim, s.num_heads, s.num_heads, bias=True, dtype=dtype, device=device, replicate=True
        )
        self.attn = VisionAttention(s.num_heads, head_dim)
        self.out_proj = build_replicated_linear(s.hidden_size, s.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class VisionMLP(nn.Module):
    def __init__(self, s: TowerSettings, dtype, device):
        super().__init__()
        self.fc1 = build_replicated_linear(s.hidden_size, s.intermediate_size, bias=True, dtype=dtype, device=device)
        self.act = get_act_fn(s.hidden_act)
        self.fc2 = build_replicated_linear(s.intermediate_size, s.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LN transformer block (CLIP and SigLIP alike)."""

    def __init__(self, s: TowerSettings, dtype, device):
        super().__init__()
        self.layer_norm1 = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
        self.self_attn = VisionSelfAttention(s, dtype, device)
        self.layer_norm2 = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
        self.mlp = VisionMLP(s, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    """CLIP or SigLIP vision transformer, up to the deepest of ``feature_layers``.

    :param vision_config: transformers' ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or the same fields).
    :param feature_layers: hidden states to return (default: the last layer's).
    :param drop_first: drop the first token of the result (CLIP's class token; LLaVA's "default").
    """

    def __init__(
        self,
        vision_config: Any,
        feature_layers: Sequence[int] | None = None,
        drop_first: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        s = self.settings = TowerSettings(vision_config)
        self.feature_layers = list(feature_layers) if feature_layers is not None else [s.num_layers]
        if not all(0 <= i <= s.num_layers for i in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} are outside the {s.num_layers}-layer tower")
        self.drop_first = drop_first
        self.embeddings = VisionEmbeddings(s, dtype, device)
        # (sic) the name in CLIP's checkpoints
        self.pre_layrnorm = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device) if s.class_token else None
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            VisionEncoderLayer(s, dtype, device) for _ in range(max(self.feature_layers))
        )

    @property
    def tokens_per_image(self) -> int:
        s = self.settings
        return s.grid * s.grid + int(s.class_token) - int(self.drop_first)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, 3, S, S]`` -> ``[images, tokens_per_image, hidden * len(feature_layers)]``."""
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        wanted = self.feature_layers
        kept = {0: x} if 0 in wanted else {}  # only the states that are returned stay alive
        for index, layer in enumerate(cast(nn.ModuleList, self.encoder.layers), start=1):
            x = layer(x)
            if index in wanted:
                kept[index] = x
        features = torch.cat([kept[i] for i in wanted], dim=-1)
        return features[:, 1:] if self.drop_first else features
