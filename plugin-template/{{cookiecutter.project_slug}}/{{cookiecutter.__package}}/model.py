{%- set C = cookiecutter.__class -%}
{%- if cookiecutter.kind == "vision" -%}
"""{{ C }}ForConditionalGeneration: a small vision tower and projector built from vlm.nn blocks, on a
language model that vlm builds for the nested text config (whichever plugin serves it).

Pixels ``[images, 3, S, S]`` -> ``p x p`` patches -> linear patch embedding + learned positions ->
pre-norm transformer layers (bidirectional attention within each image) -> LayerNorm -> 2x2 patch
merge -> MLP projector to the language model's width. Each image gives ``(S / p / merge)^2``
features; the preprocessor expands the image placeholder to exactly that many tokens, and the
core writes the features over them (``embed_images``).

Checkpoint names (see tiny_checkpoint.py): ``vision_tower.*``, ``projector.*`` and
``language_model.*``; q/k/v are separate tensors there and one fused GEMM here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.plugin import text_config_of
from vlm.plugin import build_language_model
from vlm.nn import (
    LayerNorm,
    VisionAttention,
    VisionLanguageModel,
    WeightLoader,
    WeightMapping,
    build_qkv_proj,
    build_replicated_linear,
)


class VisionSettings:
    """The fields of ``hf_config.vision_config`` the model and the preprocessor read."""

    def __init__(self, hf_config: Any):
        vc = hf_config.vision_config
        self.image_size = int(vc.image_size)
        self.patch_size = int(vc.patch_size)
        self.merge_size = int(getattr(vc, "merge_size", 2))
        self.hidden_size = int(vc.hidden_size)
        self.num_heads = int(vc.num_attention_heads)
        self.intermediate_size = int(vc.intermediate_size)
        self.num_layers = int(vc.num_hidden_layers)
        self.eps = float(getattr(vc, "layer_norm_eps", 1e-5))
        self.grid = self.image_size // self.patch_size
        if self.grid * self.patch_size != self.image_size or self.grid % self.merge_size:
            raise ValueError(
                f"vision_config: image_size {self.image_size} must be a multiple of patch_size {self.patch_size} "
                f"x merge_size {self.merge_size}"
            )

    @property
    def tokens_per_image(self) -> int:
        """Features (and placeholder tokens) per image."""
        return (self.grid // self.merge_size) ** 2


class {{ C }}VisionAttention(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        head_dim = s.hidden_size // s.num_heads
        # replicate=True: a vision tower keeps every head on every tensor-parallel rank
        self.qkv_proj = build_qkv_proj(
            s.hidden_size, head_dim, s.num_heads, s.num_heads, bias=True, dtype=dtype, device=device, replicate=True
        )
        self.out_proj = build_replicated_linear(s.hidden_size, s.hidden_size, bias=True, dtype=dtype, device=device)
        self.attn = VisionAttention(s.num_heads, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class {{ C }}VisionMLP(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.fc1 = build_replicated_linear(s.hidden_size, s.intermediate_size, bias=True, dtype=dtype, device=device)
        self.fc2 = build_replicated_linear(s.intermediate_size, s.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class {{ C }}VisionLayer(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.norm1 = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
        self.attn = {{ C }}VisionAttention(s, dtype, device)
        self.norm2 = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device)
        self.mlp = {{ C }}VisionMLP(s, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class {{ C }}VisionTower(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.settings = s
        self.patch_embed = build_replicated_linear(3 * s.patch_size**2, s.hidden_size, bias=True, dtype=dtype, device=device)
        self.position_embedding = nn.Parameter(
            torch.empty(s.grid * s.grid, s.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.layers = nn.ModuleList({{ C }}VisionLayer(s, dtype, device) for _ in range(s.num_layers))
        self.post_layernorm = LayerNorm(s.hidden_size, s.eps, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, grid * grid, hidden]``."""
        b, c, h, w = pixel_values.shape
        p = self.settings.patch_size
        # patches in row-major order, each flattened as (channel, row, column)
        patches = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_embed(patches.reshape(b, (h // p) * (w // p), c * p * p)) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class {{ C }}Projector(nn.Module):
    """Linear -> GELU -> Linear, from merged vision features to the language model's width."""

    def __init__(self, in_features: int, out_features: int, dtype, device):
        super().__init__()
        self.linear_1 = build_replicated_linear(in_features, out_features, bias=True, dtype=dtype, device=device)
        self.linear_2 = build_replicated_linear(out_features, out_features, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


def merge_patches(x: torch.Tensor, grid: int, merge: int) -> torch.Tensor:
    """``[B, grid*grid, D]`` -> ``[B, (grid/merge)^2, merge*merge*D]``: each ``merge x merge`` block
    of neighbouring patches becomes one feature (ordered row, column, channel)."""
    b, _, d = x.shape
    g = grid // merge
    x = x.reshape(b, g, merge, g, merge, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, merge * merge * d)


class {{ C }}ForConditionalGeneration(VisionLanguageModel):
    """The vision tower and projector for ``embed_images``. VisionLanguageModel sends the rest of the
    model protocol (forward, embed_tokens, compute_logits) to ``self.language_model`` and loads
    checkpoints: ``language_model.*`` tensors to the language model, the rest through
    :meth:`own_weight_loader`."""

    def __init__(self, hf_config: Any, model_config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = hf_config
        self.vision = VisionSettings(hf_config)
        s = self.vision
        text_config = text_config_of(hf_config)
        self.vision_tower = {{ C }}VisionTower(s, dtype, device)
        self.projector = {{ C }}Projector(s.merge_size**2 * s.hidden_size, text_config.hidden_size, dtype, device)
        # the core asks every plugin to match the nested text config (e.g. vlm-plugin-llama for Qwen2)
        self.language_model = build_language_model(text_config, model_config, dtype, device)

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        """One batched pass over every image -> one ``[tokens_per_image, hidden]`` tensor per image."""
        dtype = self.vision_tower.position_embedding.dtype
        pixel_values = torch.cat([image.pixel_values for image in images]).to(dtype)
        features = self.vision_tower(pixel_values)
        features = self.projector(merge_patches(features, self.vision.grid, self.vision.merge_size))
        counts = [image.pixel_values.shape[0] for image in images]
        return [part.reshape(-1, part.shape[-1]) for part in features.split(counts)]

    # -- weights: VisionLanguageModel.load_weights sends language_model.* to the language model
    # (override language_model_name for other names); the rest, our own, load through this

    def own_weight_loader(self) -> WeightLoader:
        return WeightLoader(self, mappings=QKV_MAPPINGS)


#: checkpoint q/k/v tensors are shards of the fused qkv_proj parameter
QKV_MAPPINGS = [
    WeightMapping("attn.qkv_proj", "attn.q_proj", "q"),
    WeightMapping("attn.qkv_proj", "attn.k_proj", "k"),
    WeightMapping("attn.qkv_proj", "attn.v_proj", "v"),
]
{%- else -%}
"""{{ C }}ForCausalLM: a small decoder-only language model built from vlm.nn blocks.

Pre-norm residual blocks: RMSNorm -> attention (q/k/v fused into one GEMM, rotary positions,
paged KV cache through vlm.nn.Attention) -> RMSNorm -> SwiGLU MLP (gate/up fused). The checkpoint
(see tiny_checkpoint.py) keeps q/k/v and gate/up as separate tensors; load_weights maps them onto
the fused parameters. vlm.nn layers know tensor parallelism: this file never slices a weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vlm.nn import tp_world_size
from vlm.nn import ForwardBatch
from vlm.nn import (
    Attention,
    LoadReport,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    VocabParallelEmbedding,
    WeightMapping,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
    load_weights_by_mapping,
)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class {{ C }}Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        world = tp_world_size()
        self.head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.num_heads = config.num_attention_heads // world  # heads on this tensor-parallel rank
        self.num_kv_heads = max(1, num_kv_heads // world)
        self.qkv_proj = build_qkv_proj(
            config.hidden_size, self.head_dim, config.num_attention_heads, num_kv_heads, dtype=dtype, device=device
        )
        self.o_proj = build_rowwise_linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, dtype=dtype, device=device
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


class {{ C }}MLP(nn.Module):
    def __init__(self, config: Any, dtype, device):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [size, size], dtype=dtype, device=device)
        self.down_proj = build_rowwise_linear(size, config.hidden_size, dtype=dtype, device=device)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class {{ C }}DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        self.self_attn = {{ C }}Attention(config, layer_idx, rotary_emb, dtype, device)
        self.mlp = {{ C }}MLP(config, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, positions, hidden_states, residual, batch):
        # RMSNorm(x, residual) adds the residual and normalises in one fused kernel
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class {{ C }}Model(nn.Module):
    def __init__(self, config: Any, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        rotary_emb = RotaryEmbedding(
            head_dim_of(config),
            max_position=config.max_position_embeddings,
            base=float(getattr(config, "rope_theta", 10000.0)),
            hf_config=config,
        )
        self.layers = nn.ModuleList(
            {{ C }}DecoderLayer(config, i, rotary_emb, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids, positions, batch, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, batch)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class {{ C }}ForCausalLM(nn.Module):
    """The model protocol: forward, embed_tokens, compute_logits, load_weights."""

    def __init__(self, config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = config
        self.model = {{ C }}Model(config, dtype, device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, batch: ForwardBatch, inputs_embeds=None) -> torch.Tensor:
        """Flat batch of tokens from many sequences -> hidden states ``[num_tokens, hidden]``."""
        return self.model(input_ids, positions, batch, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        ignore = [r"rotary_emb\.inv_freq$"]
        if self.tie_word_embeddings:
            ignore.append(r"^lm_head\.weight$")
        return load_weights_by_mapping(self, weights, FUSED_MAPPINGS, ignore=ignore)


#: checkpoint tensors that are shards of one fused parameter here
FUSED_MAPPINGS = [
    WeightMapping("qkv_proj", "q_proj", "q"),
    WeightMapping("qkv_proj", "k_proj", "k"),
    WeightMapping("qkv_proj", "v_proj", "v"),
    WeightMapping("gate_up_proj", "gate_proj", 0),
    WeightMapping("gate_up_proj", "up_proj", 1),
]
{%- endif %}
