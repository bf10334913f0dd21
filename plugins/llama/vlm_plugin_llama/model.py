"""Llama, Mistral, Qwen2 and Qwen3 decoders built from ``vlm.nn`` blocks.

Names follow the Hugging Face checkpoints; q/k/v and gate/up are fused into one GEMM each.
Qwen2 differs by a q/k/v bias, Qwen3 by per-head RMSNorm on q and k (and no bias).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vlm.nn import (
    Attention,
    ForwardBatch,
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
    tp_world_size,
)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        world = tp_world_size()
        self.head_dim = _head_dim(config)
        self.num_heads = config.num_attention_heads // world
        self.num_kv_heads = max(
            1, (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // world
        )
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        self.qkv_proj = build_qkv_proj(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            bias=qkv_bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = build_rowwise_linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias, dtype=dtype, device=device
        )
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1
        )
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size = config.intermediate_size
        self.gate_up_proj = build_merged_colwise_linear(
            config.hidden_size, [size, size], bias=bias, dtype=dtype, device=device
        )
        self.down_proj = build_rowwise_linear(size, config.hidden_size, bias=bias, dtype=dtype, device=device)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, dtype, device):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, positions, hidden_states, residual, batch):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        rotary_emb = RotaryEmbedding(
            _head_dim(config),
            max_position=config.max_position_embeddings,
            base=_rope_theta(config),
            rotary_dim=int(_head_dim(config) * getattr(config, "partial_rotary_factor", 1.0)),
            hf_config=config,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids, positions, batch, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, batch)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """The model protocol: ``forward``, ``embed_tokens``, ``compute_logits``, ``load_weights``."""

    def __init__(self, config, dtype=torch.float32, device=None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, batch: ForwardBatch, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, batch, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        mappings = [
            WeightMapping("qkv_proj", "q_proj", "q"),
            WeightMapping("qkv_proj", "k_proj", "k"),
            WeightMapping("qkv_proj", "v_proj", "v"),
            WeightMapping("gate_up_proj", "gate_proj", 0),
            WeightMapping("gate_up_proj", "up_proj", 1),
        ]
        ignore = [r"rotary_emb\.inv_freq$"]
        if self.tie_word_embeddings:
            ignore.append(r"^lm_head\.weight$")  # some tied checkpoints still store a copy
        return load_weights_by_mapping(self, weights, mappings, ignore=ignore)
