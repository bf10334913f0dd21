"""LLaVA-1.5 and LLaVA-NeXT: a CLIP or SigLIP vision tower, a two-layer projector, and a language
model (Llama, Mistral, Qwen2, ...) from whichever plugin claims the nested text config.

- LLaVA-1.5 (``LlavaForConditionalGeneration``): one tile per image; the hidden states of
  ``vision_feature_layer`` (an index, or several whose states are concatenated), without the first
  token when ``vision_feature_select_strategy == "default"``, go through ``multi_modal_projector``.
- LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a base tile plus a grid of tiles per image
  (anyres); the grid's features are put back together, cropped to the picture's aspect ratio
  ("unpadding") and closed by ``image_newline`` at the end of every row, as transformers'
  ``LlavaNextModel.pack_image_features`` does.

Module names follow transformers' (``vision_tower.encoder.layers.N.self_attn...``), so the
checkpoint names map with prefixes only (``own_name``, ``language_model_name``). Layers
after the deepest one ``vision_feature_layer`` reads are neither built nor loaded, and neither
are the towers' ``post_layernorm`` and SigLIP's pooling head: LLaVA reads hidden states before them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from vlm.nn import VisionLanguageModel, WeightLoader, WeightMapping
from vlm.plugin import PROJECTORS, VISION_TOWERS, ConfigError, build_language_model, composite_text_config

#: vision_config.model_type -> the tower's name in vlm.registry.VISION_TOWERS, and whether it has a
#: class token (and a LayerNorm before the encoder)
TOWERS = {"clip_vision_model": ("CLIPVisionTower", True), "siglip_vision_model": ("SiglipVisionTower", False)}


class VisionSettings:
    """The vision fields of a LLaVA config, and which hidden states the projector reads."""

    def __init__(self, hf_config: Any):
        vc = hf_config.vision_config
        tower = getattr(vc, "model_type", None)
        if tower not in TOWERS:
            raise ConfigError(
                f"config.json vision_config.model_type is {tower!r}; the llava plugin runs "
                f"{' and '.join(TOWERS)} towers"
            )
        self.tower_type, self.class_token = TOWERS[tower]  # CLIP: class token + pre_layrnorm; SigLIP: neither
        self.hidden_size = vc.hidden_size
        self.num_heads = vc.num_attention_heads
        self.intermediate_size = vc.intermediate_size
        self.num_layers = vc.num_hidden_layers
        self.image_size = int(vc.image_size)
        self.patch_size = int(vc.patch_size)
        self.eps = vc.layer_norm_eps
        self.hidden_act = vc.hidden_act
        self.grid = self.image_size // self.patch_size

        layer = getattr(hf_config, "vision_feature_layer", -2)
        layers = [layer] if isinstance(layer, int) else list(layer)
        # hidden state i: 0 is the embeddings (after pre_layrnorm), i > 0 the output of layer i
        self.feature_layers = [i if i >= 0 else self.num_layers + 1 + i for i in layers]
        if not all(0 <= i <= self.num_layers for i in self.feature_layers):
            raise ConfigError(
                f"config.json vision_feature_layer {layer!r} is outside the {self.num_layers}-layer vision tower"
            )
        self.layers_used = max(self.feature_layers)
        strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"config.json vision_feature_select_strategy is {strategy!r}; use 'default' or 'full'")
        # "default" drops the first token: the class token of CLIP, but also SigLIP's first patch
        self.drop_first = strategy == "default"
        self.tokens_per_tile = self.grid * self.grid + int(self.class_token) - int(self.drop_first)


class LlavaForConditionalGeneration(VisionLanguageModel):
    """LLaVA-1.5: vision tower and projector for ``embed_images``; text goes straight to the
    language model (:class:`vlm.nn.VisionLanguageModel`)."""

    def __init__(self, hf_config: Any, model_config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = hf_config
        self.vision = VisionSettings(hf_config)
        s = self.vision
        self.vision_tower = VISION_TOWERS.build(
            dict(
                type=s.tower_type,
                vision_config=hf_config.vision_config,
                feature_layers=s.feature_layers,
                drop_first=s.drop_first,
                dtype=dtype,
                device=device,
            )
        )
        # LlavaConfig folds the text config's tie flag into its own, which composite_text_config reads
        text_config = composite_text_config(hf_config)
        self.multi_modal_projector = PROJECTORS.build(
            dict(
                type="MLPProjector",
                in_features=s.hidden_size * len(s.feature_layers),
                out_features=text_config.hidden_size,
                act=getattr(hf_config, "projector_hidden_act", "gelu"),
                bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
                dtype=dtype,
                device=device,
            )
        )
        self.language_model = build_language_model(text_config, model_config, dtype, device)

    def tile_features(self, images: list[Any]) -> list[torch.Tensor]:
        """One batched pass over every tile of every image -> ``[tiles, tokens_per_tile, hidden]`` per image."""
        pixel_values = torch.cat([image.pixel_values for image in images])
        features = self.multi_modal_projector(self.vision_tower(pixel_values))
        return list(features.split([image.pixel_values.shape[0] for image in images]))

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        return [tiles.reshape(-1, tiles.shape[-1]) for tiles in self.tile_features(images)]

    # -- weights (load_weights: VisionLanguageModel's) ---------------------------------------

    def own_weight_loader(self) -> WeightLoader:
        return WeightLoader(self, mappings=_QKV, ignore=_UNUSED, rename=self.own_name)

    def own_name(self, name: str) -> str | None:
        """A vision / projector / newline tensor's checkpoint name -> its parameter name (None: skip)."""
        # transformers' module names start with "model."; the Hub's CLIP / SigLIP towers nest "vision_model."
        name = re.sub(r"^model\.(?=vision_tower\.|multi_modal_projector\.|image_newline$)", "", name)
        name = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", name)
        layer = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= self.vision.layers_used:
            return None  # after the deepest feature layer: never run, so not built
        return name

    def language_model_name(self, name: str) -> str | None:
        """The language model's name for one of its tensors, in any LLaVA layout; None for the rest."""
        if name.startswith("language_model."):  # as the Hub's repos store it: language_model.{model,lm_head}.*
            rest = name[len("language_model.") :]
            return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
        if name.startswith("model.language_model."):  # transformers 5's module names
            return "model." + name[len("model.language_model.") :]
        if name.startswith("lm_head."):
            return name
        return None


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT: anyres tiles packed as transformers' ``pack_image_features`` does."""

    def __init__(self, hf_config: Any, model_config: Any, dtype=torch.float32, device=None):
        super().__init__(hf_config, model_config, dtype=dtype, device=device)
        s = self.vision
        if s.tokens_per_tile != s.grid * s.grid:
            raise ConfigError(
                f"LLaVA-NeXT needs one feature per patch, but vision_feature_select_strategy "
                f"{'default' if s.drop_first else 'full'!r} with this tower leaves {s.tokens_per_tile} of "
                f"{s.grid * s.grid}; use 'default' with a CLIP tower, 'full' with SigLIP"
            )
        self.grid_pinpoints = [tuple(p) for p in hf_config.image_grid_pinpoints]
        hidden = self.multi_modal_projector.linear_2.out_features
        self.image_newline = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device), requires_grad=False)

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        return [
            self.pack(tiles, image.extra["original_size"]) for image, tiles in zip(images, self.tile_features(images))
        ]

    def pack(self, tiles: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """``[1 + rows * cols, side * side, hidden]`` -> base tile, then the unpadded grid row by row,
        each row closed by ``image_newline``."""
        base, grid = tiles[0], tiles[1:]
        if grid.shape[0] == 0:  # transformers' branch for a lone tile
            return torch.cat([base, self.image_newline[None]])
        from transformers.image_processing_utils import select_best_resolution

        side = self.vision.grid
        height, width = select_best_resolution(tuple(original_size), self.grid_pinpoints)
        rows, cols = height // self.vision.image_size, width // self.vision.image_size
        x = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [C, H, W]
        x = unpad(x, original_size)
        newline = self.image_newline[:, None, None].expand(-1, x.shape[1], 1)
        x = torch.cat([x, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, x])


def unpad(x: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Crop ``[C, H, W]`` features of a padded picture to the picture's aspect ratio (transformers'
    ``unpad_image``, rounding included)."""
    original_height, original_width = original_size
    current_height, current_width = x.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return x[:, padding : current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return x[:, :, padding : current_width - padding]


_QKV = [
    WeightMapping("self_attn.qkv_proj", "self_attn.q_proj", "q"),
    WeightMapping("self_attn.qkv_proj", "self_attn.k_proj", "k"),
    WeightMapping("self_attn.qkv_proj", "self_attn.v_proj", "v"),
]

#: stored but never read by LLaVA (checked after own_name renamed them)
_UNUSED = [r"^vision_tower\.post_layernorm\.", r"^vision_tower\.head\.", r"\.position_ids$"]
