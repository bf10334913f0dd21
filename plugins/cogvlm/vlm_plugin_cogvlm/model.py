"""CogVLM and CogVLM2: an EVA2-CLIP tower and projector, and a Llama decoder with visual experts.

- Tower (EVA2-CLIP-E): a conv patch embedding, a class token and learned position embeddings,
  then *post-norm* blocks (``x + LayerNorm(attention(x))``, ``x + LayerNorm(mlp(x))``). The class
  token is dropped; CogVLM2 merges 2x2 patches with a stride-2 conv. A GLU projector (linear,
  LayerNorm, GELU, then SwiGLU) maps to the decoder's width, between the learned ``boi`` and
  ``eoi`` embeddings: one picture is ``boi, patches..., eoi``.
- Decoder: Llama (RMSNorm, rotary, SwiGLU) whose every layer has a vision expert (QKV with a bias,
  dense, MLP) besides the language weights. Image tokens go through the vision expert *except each
  picture's last one (eoi)*: the original routes a token to the vision expert only when the next
  token is an image token too (``get_expert_mask``). CogVLM2 uses grouped-query attention.

Module names follow the Hub checkpoints (``model.vision.*``, ``model.layers.*``), so the Hub layout
loads by name; the SAT layout is renamed to it (:func:`sat_to_hub_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vlm.nn import (
    Attention,
    ConvPatchEmbedding,
    ForwardBatch,
    LayerNorm,
    LoadReport,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    VisionAttention,
    VisualExpertMLP,
    VisualExpertQKV,
    VisualExpertRowwiseLinear,
    VocabParallelEmbedding,
    WeightMapping,
    build_qkv_proj,
    build_replicated_linear,
    get_act_fn,
    load_weights_by_mapping,
    tp_world_size,
    vision_batches,
)
from vlm.plugin import PROJECTORS
from vlm_plugin_cogvlm.config import CogVLMSettings
from vlm_plugin_cogvlm.preprocess import EOI_POSITION

# -- the tower: EVA2-CLIP -------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        self.proj = ConvPatchEmbedding(
            s.in_channels, s.vision_hidden_size, s.patch_size, bias=True, dtype=dtype, device=device
        )
        self.cls_embedding = nn.Parameter(
            torch.empty(1, s.vision_hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.position_embedding = nn.Embedding(s.grid * s.grid + 1, s.vision_hidden_size, dtype=dtype, device=device)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixel_values)  # [B, grid * grid, D]
        cls = self.cls_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class EVAAttention(nn.Module):
    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        head_dim = s.vision_hidden_size // s.vision_heads
        # one fused [3 * D, D] tensor in q, k, v order; replicated: the tower is small next to the decoder
        self.query_key_value = build_qkv_proj(
            s.vision_hidden_size,
            head_dim,
            s.vision_heads,
            s.vision_heads,
            bias=True,
            dtype=dtype,
            device=device,
            replicate=True,
        )
        self.attn = VisionAttention(s.vision_heads, head_dim)
        self.dense = build_replicated_linear(
            s.vision_hidden_size, s.vision_hidden_size, bias=True, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        return self.dense(self.attn(q, k, v))


class EVAMLP(nn.Module):
    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        self.fc1 = build_replicated_linear(
            s.vision_hidden_size, s.vision_intermediate_size, bias=True, dtype=dtype, device=device
        )
        self.act = get_act_fn(s.vision_act)
        self.fc2 = build_replicated_linear(
            s.vision_intermediate_size, s.vision_hidden_size, bias=True, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EVALayer(nn.Module):
    """Post-norm: the LayerNorms sit on the branch outputs, inside the residual."""

    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        self.input_layernorm = LayerNorm(s.vision_hidden_size, s.vision_eps, dtype=dtype, device=device)
        self.attention = EVAAttention(s, dtype, device)
        self.mlp = EVAMLP(s, dtype, device)
        self.post_attention_layernorm = LayerNorm(s.vision_hidden_size, s.vision_eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class EVATransformer(nn.Module):
    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList(EVALayer(s, dtype, device) for _ in range(s.vision_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EVA2CLIPModel(nn.Module):
    """Pixels ``[B, 3, S, S]`` -> ``[B, image_tokens, hidden]``: boi, projected patches, eoi."""

    def __init__(self, s: CogVLMSettings, dtype=None, device=None):
        super().__init__()
        self.settings = s
        self.patch_embedding = PatchEmbedding(s, dtype, device)
        self.transformer = EVATransformer(s, dtype, device)
        if s.downsample:  # CogVLM2: 2x2 patches -> one, already at the decoder's width
            self.conv = ConvPatchEmbedding(
                s.vision_hidden_size, s.hidden_size, 2, bias=True, dtype=dtype, device=device
            )
        projector_in = s.hidden_size if s.downsample else s.vision_hidden_size
        self.linear_proj = PROJECTORS.build(
            dict(
                type="GLUProjector",
                in_features=projector_in,
                hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size,
                dtype=dtype,
                device=device,
            )
        )
        self.boi = nn.Parameter(torch.empty(1, 1, s.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eoi = nn.Parameter(torch.empty(1, 1, s.hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.boi.dtype))
        x = self.transformer(x)[:, 1:]  # the class token is not handed on
        if self.settings.downsample:
            grid = self.settings.grid
            x = self.conv(x.transpose(1, 2).reshape(x.shape[0], -1, grid, grid))
        x = self.linear_proj(x)
        ends = (self.boi.expand(x.shape[0], -1, -1), self.eoi.expand(x.shape[0], -1, -1))
        return torch.cat([ends[0], x, ends[1]], dim=1)


def build_eva2clip_tower(hf_config: Any, dtype=None, device=None) -> EVA2CLIPModel:
    """EVA2-CLIP with CogVLM's projector (registered as ``cogvlm.EVA2CLIPVisionTower``)."""
    return EVA2CLIPModel(CogVLMSettings(hf_config), dtype, device)


# -- the decoder: Llama with visual experts --------------------------------------------------------


class VisionExpertAttention(nn.Module):
    def __init__(self, s: CogVLMSettings, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        world = tp_world_size()
        self.head_dim = s.head_dim
        self.num_heads = s.num_heads // world
        self.num_kv_heads = max(1, s.num_kv_heads // world)
        # the original gives the vision expert's QKV a bias and the language expert's none
        self.query_key_value = VisualExpertQKV(
            s.hidden_size,
            s.head_dim,
            s.num_heads,
            s.num_kv_heads,
            language_bias=False,
            vision_bias=True,
            dtype=dtype,
            device=device,
        )
        self.dense = VisualExpertRowwiseLinear(s.num_heads * s.head_dim, s.hidden_size, dtype=dtype, device=device)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx)

    def forward(self, positions, hidden_states, vision_rows, batch: ForwardBatch) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.query_key_value(hidden_states, vision_rows).split([q_size, kv_size, kv_size], -1)
        q, k = self.rotary_emb(
            positions, q.view(tokens, self.num_heads, self.head_dim), k.view(tokens, self.num_kv_heads, self.head_dim)
        )
        out = self.attn(q, k, v.view(tokens, self.num_kv_heads, self.head_dim), batch)
        return self.dense(out, vision_rows)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, s: CogVLMSettings, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = VisionExpertAttention(s, layer_idx, rotary_emb, dtype, device)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = VisualExpertMLP(s.hidden_size, s.intermediate_size, dtype=dtype, device=device)

    def forward(self, positions, hidden_states, residual, vision_rows, batch):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, vision_rows, batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states, vision_rows), residual


class CogVLMModel(nn.Module):
    def __init__(self, s: CogVLMSettings, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(s.vocab_size, s.hidden_size, dtype=dtype, device=device)
        rotary = RotaryEmbedding(s.head_dim, max_position=s.max_position_embeddings, base=s.rope_theta, is_neox=True)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(s, i, rotary, dtype, device) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype=dtype, device=device)
        self.vision = EVA2CLIPModel(s, dtype, device)


def vision_expert_rows(batch: ForwardBatch, positions: torch.Tensor) -> torch.Tensor | None:
    """The rows the vision expert takes: image tokens except each picture's eoi (the original's
    ``get_expert_mask``: vision only when the next token is an image token too). The picture
    follows BOS, so its eoi is the image token at :data:`EOI_POSITION`; telling it by position holds
    however the prompt is chunked."""
    mask = batch.image_token_mask
    if mask is None:
        return None
    return mask & (positions != EOI_POSITION)


class CogVLMForCausalLM(nn.Module):
    """The model protocol: ``forward``, ``embed_tokens``, ``compute_logits``, ``embed_images``, ``load_weights``."""

    def __init__(self, hf_config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = hf_config
        self.settings = s = CogVLMSettings(hf_config)
        self.model = CogVLMModel(s, dtype, device)
        self.lm_head = ParallelLMHead(s.vocab_size, s.hidden_size, dtype=dtype, device=device)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        """One ``[image_tokens, hidden]`` tensor per picture (boi, patches, eoi); pictures go through
        the tower in the groups :func:`vlm.nn.vision_batches` picks for the device."""
        pixels = [image.pixel_values for image in images]
        features = [self.model.vision(torch.cat(group)) for group in vision_batches(pixels[0].device, pixels)]
        return list(torch.cat(features).unbind(0))

    def forward(self, input_ids, positions, batch: ForwardBatch, inputs_embeds=None) -> torch.Tensor:
        hidden_states = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        vision_rows = vision_expert_rows(batch, positions)
        residual = None
        for layer in self.model.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, vision_rows, batch)
        hidden_states, _ = self.model.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        rename = sat_to_hub_name if self.settings.layout == "sat" else None
        return load_weights_by_mapping(
            self, weights, _EXPERT_MAPPINGS, ignore=[r"rotary_emb\.inv_freq$"], rename=_internal_name(rename)
        )


#: gate and up of each expert's MLP are one fused GEMM (shards 0 and 1)
_EXPERT_MAPPINGS = [
    WeightMapping(f"mlp.{expert}.gate_up_proj", f"mlp.{expert}.{name}", shard)
    for expert in ("language", "vision")
    for name, shard in (("gate_proj", 0), ("up_proj", 1))
]

#: Hub names of the experts -> the vlm.nn blocks' ``.language`` / ``.vision`` halves
_HUB_TO_INTERNAL = [
    (re.compile(r"\.self_attn\.(language|vision)_expert_query_key_value\."), r".self_attn.query_key_value.\1."),
    (re.compile(r"\.self_attn\.(language|vision)_expert_dense\."), r".self_attn.dense.\1."),
    (re.compile(r"\.mlp\.(language|vision)_mlp\."), r".mlp.\1."),
]


def _internal_name(first=None):
    def rename(name: str) -> str | None:
        if first is not None:
            renamed = first(name)
            if renamed is None:
                return None
            name = renamed
        for pattern, replacement in _HUB_TO_INTERNAL:
            name = pattern.sub(replacement, name)
        return name

    return rename


# -- the SAT layout ---------------------------------------------------------------------------------

#: SwissArmyTransformer's names (CogVLM 1's ``CogVLMModel``: LLaMAModel with the "eva", "mlp" and
#: "rotary" mixins) -> the Hub's. ``{i}`` is a layer index.
_SAT_TO_HUB = [
    (r"^transformer\.word_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^transformer\.final_layernorm\.weight$", "model.norm.weight"),
    (r"^mixins\.lm\.lm_head\.weight$", "lm_head.weight"),
    (r"^transformer\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.", r"model.layers.\1.\2."),
    (
        r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.",
        r"model.layers.\1.self_attn.language_expert_query_key_value.",
    ),
    (r"^transformer\.layers\.(\d+)\.attention\.dense\.", r"model.layers.\1.self_attn.language_expert_dense."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.language_mlp.up_proj."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.language_mlp.down_proj."),
    (r"^mixins\.mlp\.gate_proj\.(\d+)\.", r"model.layers.\1.mlp.language_mlp.gate_proj."),
    (r"^mixins\.mlp\.vision_gate_proj\.(\d+)\.", r"model.layers.\1.mlp.vision_mlp.gate_proj."),
    (r"^mixins\.mlp\.vision_dense_h_to_4h_list\.(\d+)\.", r"model.layers.\1.mlp.vision_mlp.up_proj."),
    (r"^mixins\.mlp\.vision_dense_4h_to_h_list\.(\d+)\.", r"model.layers.\1.mlp.vision_mlp.down_proj."),
    (
        r"^mixins\.rotary\.vision_query_key_value_list\.(\d+)\.",
        r"model.layers.\1.self_attn.vision_expert_query_key_value.",
    ),
    (r"^mixins\.rotary\.vision_dense_list\.(\d+)\.", r"model.layers.\1.self_attn.vision_expert_dense."),
    # the tower: SAT's ViT keeps the class token as a one-word vocabulary
    (r"^mixins\.eva\.vit_model\.mixins\.patch_embedding\.proj\.", "model.vision.patch_embedding.proj."),
    (r"^mixins\.eva\.vit_model\.transformer\.word_embeddings\.weight$", "model.vision.patch_embedding.cls_embedding"),
    (
        r"^mixins\.eva\.vit_model\.transformer\.position_embeddings\.weight$",
        "model.vision.patch_embedding.position_embedding.weight",
    ),
    (
        r"^mixins\.eva\.vit_model\.transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.",
        r"model.vision.transformer.layers.\1.mlp.fc1.",
    ),
    (
        r"^mixins\.eva\.vit_model\.transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.",
        r"model.vision.transformer.layers.\1.mlp.fc2.",
    ),
    (r"^mixins\.eva\.vit_model\.transformer\.layers\.(\d+)\.", r"model.vision.transformer.layers.\1."),
    (r"^mixins\.eva\.(linear_proj|conv)\.", r"model.vision.\1."),
    (r"^mixins\.eva\.(boi|eoi)$", r"model.vision.\1"),
]
_SAT_PATTERNS = [(re.compile(pattern), replacement) for pattern, replacement in _SAT_TO_HUB]


def sat_to_hub_name(name: str) -> str:
    """A SAT checkpoint name as the Hub layout calls the tensor (unknown names are kept, and
    reported unexpected by the loader)."""
    for pattern, replacement in _SAT_PATTERNS:
        renamed, count = pattern.subn(replacement, name)
        if count:
            return renamed
    return name
