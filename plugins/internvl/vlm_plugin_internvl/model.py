"""InternVL: InternViT vision tower + pixel shuffle + MLP projector + a language model from the core.

One implementation serves both checkpoint layouts found in the wild:

- Hugging Face (``model_type: "internvl"``, ``InternVLForConditionalGeneration``): split q/k/v,
  ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``.
- original OpenGVLab (``InternVLChatModel``): fused ``attn.qkv``, ``vision_model.*``, ``mlp1.*``,
  ``language_model.*`` (Qwen2, Llama or InternLM2 inside).

Module names follow the original InternViT code; :func:`hf_to_internal` maps the other layout.
The language model is whatever plugin claims the nested text config (``vlm.plugin.build_language_model``).
"""

from __future__ import annotations

import math
import re
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from vlm.nn import (
    ConvPatchEmbedding,
    LayerNorm,
    RMSNorm,
    VisionAttention,
    VisionLanguageModel,
    WeightLoader,
    WeightMapping,
    build_qkv_proj,
    build_replicated_linear,
    get_act_fn,
    pixel_shuffle,
    vision_batches,
)
from vlm.plugin import PROJECTORS, VISION_TOWERS, build_language_model, composite_text_config


def _pair(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class VisionSettings:
    """The vision fields of either layout's config, under one set of names."""

    def __init__(self, hf_config: Any):
        vc = hf_config.vision_config
        self.hf_layout = getattr(hf_config, "model_type", None) == "internvl"
        self.hidden_size = vc.hidden_size
        self.num_heads = vc.num_attention_heads
        self.intermediate_size = vc.intermediate_size
        self.num_layers = vc.num_hidden_layers
        self.image_size = _pair(getattr(hf_config, "force_image_size", None) or vc.image_size)
        self.patch_size = _pair(vc.patch_size)
        self.eps = getattr(vc, "layer_norm_eps", 1e-6)
        self.norm_type = getattr(vc, "norm_type", "layer_norm")
        self.hidden_act = getattr(vc, "hidden_act", "gelu")
        if self.hf_layout:
            self.qkv_bias = bool(getattr(vc, "attention_bias", False))
            self.qk_norm = bool(getattr(vc, "use_qk_norm", False))
            self.post_layernorm = not getattr(vc, "use_mean_pooling", True)
            self.feature_layer = getattr(hf_config, "vision_feature_layer", -1)
            self.drop_cls = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
            self.projector_act = getattr(hf_config, "projector_hidden_act", "gelu")
            self.pixel_shuffle_v1 = False
        else:
            self.qkv_bias = bool(getattr(vc, "qkv_bias", True))
            self.qk_norm = bool(getattr(vc, "qk_normalization", False))
            self.post_layernorm = False
            self.feature_layer = getattr(hf_config, "select_layer", -1)
            self.drop_cls = True
            self.projector_act = "gelu"
            self.pixel_shuffle_v1 = getattr(hf_config, "ps_version", "v2") == "v1"
        self.downsample_ratio = hf_config.downsample_ratio
        layer = self.feature_layer
        self.layers_used = layer if layer >= 0 else self.num_layers + 1 + layer


def _norm(settings: VisionSettings, dtype, device) -> nn.Module:
    if settings.norm_type == "rms_norm":
        return RMSNorm(settings.hidden_size, settings.eps, dtype=dtype, device=device)
    return LayerNorm(settings.hidden_size, settings.eps, dtype=dtype, device=device)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.patch_size = s.patch_size
        self.grid = s.image_size // s.patch_size
        self.class_embedding = nn.Parameter(
            torch.empty(1, 1, s.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.patch_embedding = ConvPatchEmbedding(3, s.hidden_size, s.patch_size, bias=True, dtype=dtype, device=device)
        self.position_embedding = nn.Parameter(
            torch.empty(1, self.grid * self.grid + 1, s.hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def _positions(self, height: int, width: int) -> torch.Tensor:
        if height == width == self.grid:
            return self.position_embedding
        # tiles of another size than the checkpoint's: interpolate the grid as InternViT does
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(height, width), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(cls_pos.dtype).permute(0, 2, 3, 1).reshape(1, height * width, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = self.patch_embedding.grid(pixel_values)
        patches = self.patch_embedding(pixel_values)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self._positions(height, width)


class InternAttention(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        head_dim = s.hidden_size // s.num_heads
        self.qkv_proj = build_qkv_proj(
            s.hidden_size,
            head_dim,
            s.num_heads,
            s.num_heads,
            bias=s.qkv_bias,
            dtype=dtype,
            device=device,
            replicate=True,
        )
        self.qk_norm = s.qk_norm
        if s.qk_norm:  # over all heads at once, not per head
            self.q_norm = RMSNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
        self.attn = VisionAttention(s.num_heads, head_dim)
        self.proj = build_replicated_linear(s.hidden_size, s.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(self.attn(q, k, v))


class InternMLP(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.fc1 = build_replicated_linear(s.hidden_size, s.intermediate_size, bias=True, dtype=dtype, device=device)
        self.fc2 = build_replicated_linear(s.intermediate_size, s.hidden_size, bias=True, dtype=dtype, device=device)
        self.act = get_act_fn(s.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.attn = InternAttention(s, dtype, device)
        self.mlp = InternMLP(s, dtype, device)
        self.norm1 = _norm(s, dtype, device)
        self.norm2 = _norm(s, dtype, device)
        self.ls1 = nn.Parameter(torch.ones(s.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.ls2 = nn.Parameter(torch.ones(s.hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionModel(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.settings = s
        self.embeddings = InternVisionEmbeddings(s, dtype, device)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(InternVisionEncoderLayer(s, dtype, device) for _ in range(s.num_layers))
        self.post_layernorm = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device) if s.post_layernorm else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, H, W]`` -> features of the configured layer, ``[tiles, 1 + patches, D]``."""
        x = self.embeddings(pixel_values)
        layers = cast(nn.ModuleList, self.encoder.layers)
        for layer in layers[: self.settings.layers_used]:
            x = layer(x)
        if self.post_layernorm is not None and self.settings.layers_used == self.settings.num_layers:
            x = self.post_layernorm(x)
        return x


def build_intern_vision_tower(hf_config: Any, dtype=None, device=None) -> InternVisionModel:
    """InternViT as an InternVL config sets it up (registered as ``internvl.InternVisionTower``)."""
    return InternVisionModel(VisionSettings(hf_config), dtype, device)


class InternVLChatModel(VisionLanguageModel):
    """InternViT, pixel shuffle and projector for ``embed_images``; text goes straight to the
    language model (:class:`vlm.nn.VisionLanguageModel`)."""

    def __init__(self, hf_config: Any, model_config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = hf_config
        self.vision = VisionSettings(hf_config)
        s = self.vision
        self.vision_model = VISION_TOWERS.build(
            dict(type="internvl.InternVisionTower", hf_config=hf_config, dtype=dtype, device=device)
        )
        # the original layout's llm_config carries its own tie flag
        text_config = composite_text_config(hf_config) if s.hf_layout else hf_config.get_text_config()
        scale = int(round(1 / s.downsample_ratio))
        self.projector = PROJECTORS.build(
            dict(
                type="LayerNormMLPProjector",
                in_features=s.hidden_size * scale * scale,
                out_features=text_config.hidden_size,
                act=s.projector_act,
                dtype=dtype,
                device=device,
            )
        )
        self.language_model = build_language_model(text_config, model_config, dtype, device)

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        """Every tile of every image through the tower -> ``[tiles * tokens_per_tile, hidden]`` each.

        Tiles go through the tower in the groups :func:`vlm.nn.vision_batches` picks for the
        device: one batched pass on GPUs, tile by tile on CPU.
        """
        pixel_values = torch.cat([image.pixel_values for image in images]).to(self.projector.layer_norm.weight.dtype)
        if torch.compiler.is_exporting():
            # an exported graph takes any number of tiles: a loop over them would fix the count
            features = self.vision_model(pixel_values)
        else:
            tiles = list(pixel_values.split(1))
            features = torch.cat(
                [self.vision_model(torch.cat(group)) for group in vision_batches(pixel_values.device, tiles)]
            )
        if self.vision.drop_cls:
            features = features[:, 1:]
        side = int(math.isqrt(features.shape[1]))
        features = features.reshape(features.shape[0], side, side, -1)
        features = pixel_shuffle(features, self.vision.downsample_ratio, self.vision.pixel_shuffle_v1)
        features = self.projector(features.reshape(features.shape[0], -1, features.shape[-1]))
        tiles = [image.pixel_values.shape[0] for image in images]
        return [part.reshape(-1, part.shape[-1]) for part in features.split(tiles)]

    # -- weights (load_weights: VisionLanguageModel's) ---------------------------------------

    def own_weight_loader(self) -> WeightLoader:
        if self.vision.hf_layout:
            return WeightLoader(self, mappings=_HF_QKV, rename=hf_to_internal)
        return WeightLoader(self, rename=original_to_internal)

    def language_model_name(self, name: str) -> str | None:
        """Both layouts save ``language_model.{model,lm_head}.*`` (the base's rule); transformers'
        in-memory names of the Hugging Face layout are ``model.language_model.*`` and ``lm_head.*``."""
        if self.vision.hf_layout:
            if name.startswith("model.language_model."):
                return "model." + name[len("model.language_model.") :]
            if name.startswith("lm_head."):
                return name
        return super().language_model_name(name)


_HF_QKV = [
    WeightMapping("attn.qkv_proj", "attn.q_proj", "q"),
    WeightMapping("attn.qkv_proj", "attn.k_proj", "k"),
    WeightMapping("attn.qkv_proj", "attn.v_proj", "v"),
]

_HF_RENAMES = [
    (r"^vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (
        r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
        r"vision_model.encoder.layers.\1.attn.proj.",
    ),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.", r"vision_model.encoder.layers.\1.attn."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^vision_tower\.layernorm\.", "vision_model.post_layernorm."),
    (r"^multi_modal_projector\.", "projector."),
]


def hf_to_internal(name: str) -> str:
    # saved files say "vision_tower.*"; transformers' in-memory names add a "model." prefix
    name = re.sub(r"^model\.(?=vision_tower\.|multi_modal_projector\.)", "", name)
    for pattern, replacement in _HF_RENAMES:
        name, count = re.subn(pattern, replacement, name)
        if count:
            return name
    return name


def original_to_internal(name: str) -> str:
    name = re.sub(r"\.attn\.qkv\.", ".attn.qkv_proj.", name)
    for index, target in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        name = re.sub(rf"^mlp1\.{index}\.", f"projector.{target}.", name)
    return name
