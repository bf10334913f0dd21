"""InternLM2 (the language model of several InternVL sizes) as a Llama with other tensor names.

InternLM2 *is* Llama architecturally: RMSNorm, neox rotary, GQA attention, SwiGLU MLP. It
differs in checkpoint layout only:

- ``attention.wqkv`` packs q, k and v *grouped by kv head*: viewed as
  ``[num_kv_heads, q_per_kv + 2, head_dim, hidden]``, each kv head's q heads come first, then
  its k head, then its v head. We un-group it into full q, k and v and hand those to
  :class:`vlm.nn.linear.QKVLinear`'s loader, which keeps this rank's slice (so tensor parallelism works
  unchanged).
- other names: ``tok_embeddings``, ``attention.wo``, ``feed_forward.w1/w3/w2`` (gate/up/down),
  ``attention_norm``, ``ffn_norm``, ``output``.
- config.json (read as a :class:`vlm.config.RawConfig`: transformers has no InternLM2 class)
  has one ``bias`` flag for wqkv *and* wo, and ``rope_scaling = {"type", "factor"}``.

The config is translated into a ``transformers.LlamaConfig`` that the Llama blocks read, so no
Qwen2/Qwen3 branch of the Llama code can fire on it. Rope scaling: ``linear`` is transformers'
linear rope; ``dynamic`` (the usual InternVL setting) is the unscaled rope, exactly: the
reference code rescales only once a sequence is longer than ``max_position_embeddings``, and
the engine caps the context at ``max_position_embeddings``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm.nn import (
    LoadReport,
    ShapeMismatch,
    WeightMapping,
    load_weights_by_mapping,
    set_weight_loader,
    weight_loader_of,
)
from vlm.plugin import ConfigError
from vlm_plugin_llama.model import LlamaForCausalLM

if TYPE_CHECKING:
    from vlm.nn.linear import QKVLinear

#: InternLM2 checkpoint name -> our (Llama) parameter name: prefixes, then dotted parts
_PREFIXES = {"model.tok_embeddings.": "model.embed_tokens.", "output.": "lm_head."}
_PARTS = {
    ".attention.wqkv.": ".self_attn.qkv_proj.",  # un-grouped by grouped_qkv_loader
    ".attention.wo.": ".self_attn.o_proj.",
    ".feed_forward.w1.": ".mlp.gate_proj.",  # gate and up: shards of gate_up_proj, by _MAPPINGS
    ".feed_forward.w3.": ".mlp.up_proj.",
    ".feed_forward.w2.": ".mlp.down_proj.",
    ".attention_norm.": ".input_layernorm.",
    ".ffn_norm.": ".post_attention_layernorm.",
}
_MAPPINGS = [WeightMapping("gate_up_proj", "gate_proj", 0), WeightMapping("gate_up_proj", "up_proj", 1)]


def _translate(name: str, prefixes: dict[str, str], parts: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if name.startswith(old):
            name = new + name[len(old) :]
    for old, new in parts.items():
        name = name.replace(old, new)
    return name


def _to_ours(name: str) -> str:
    return _translate(name, _PREFIXES, _PARTS)


def _to_checkpoint(name: str) -> str:
    """Our parameter name back to the InternLM2 checkpoint name (for the load report)."""
    return _translate(name, {v: k for k, v in _PREFIXES.items()}, {v: k for k, v in _PARTS.items()})


def llama_config(config):
    """The ``transformers.LlamaConfig`` equivalent of an InternLM2 config (defaults as InternLM2Config)."""
    from transformers import LlamaConfig

    heads = config.num_attention_heads
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"InternLM2 config.json: hidden_act {hidden_act!r} is not supported (only 'silu')")
    theta = float(getattr(config, "rope_theta", None) or 10000.0)
    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = getattr(config, "rope_scaling", None)
    if scaling is not None:
        scaling = scaling if isinstance(scaling, dict) else vars(scaling)  # RawConfig -> dict
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind == "linear":
            rope = {"rope_type": "linear", "factor": float(scaling["factor"]), "rope_theta": theta}
        elif kind != "dynamic":  # dynamic: unscaled within max_position_embeddings (see module doc)
            raise ConfigError(
                f"InternLM2 config.json: rope_scaling type {kind!r} is not supported ('linear' or 'dynamic')"
            )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=config.hidden_size // heads,  # InternLM2 has no head_dim field
        max_position_embeddings=getattr(config, "max_position_embeddings", None) or 2048,
        rms_norm_eps=getattr(config, "rms_norm_eps", None) or 1e-6,
        rope_parameters=rope,
        attention_bias=bool(getattr(config, "bias", True)),  # wqkv and wo alike
        mlp_bias=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def grouped_qkv_loader(layer: QKVLinear):
    """A ``weight_loader`` taking InternLM2's grouped wqkv (weight or bias) for ``layer``."""
    load_shard = weight_loader_of(layer.weight)  # QKVLinear's: full q/k/v tensor + "q"/"k"/"v"
    kv_heads, head_dim = layer.total_kv_heads, layer.head_dim
    q_per_kv = layer.total_heads // kv_heads

    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        expected = ((layer.total_heads + 2 * kv_heads) * head_dim, *param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise ShapeMismatch(expected, tuple(loaded.shape))
        rest = tuple(loaded.shape[1:])
        grouped = loaded.reshape(kv_heads, q_per_kv + 2, head_dim, *rest)
        load_shard(param, grouped[:, :q_per_kv].reshape(-1, *rest), "q")
        load_shard(param, grouped[:, -2].reshape(-1, *rest), "k")
        load_shard(param, grouped[:, -1].reshape(-1, *rest), "v")

    return load


class InternLM2ForCausalLM(LlamaForCausalLM):
    """The model protocol of :class:`LlamaForCausalLM`; only config and weight names differ."""

    def __init__(self, config, dtype=torch.float32, device=None):
        super().__init__(llama_config(config), dtype=dtype, device=device)
        self.config = config  # the InternLM2 config, as the engine gave it
        for layer in self.model.layers:
            qkv = layer.self_attn.qkv_proj
            loader = grouped_qkv_loader(qkv)
            for param in (qkv.weight, qkv.bias):
                if param is not None:
                    set_weight_loader(param, loader, [None])  # wqkv arrives whole, not as q/k/v shards

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        ignore = [r"rotary_emb\.inv_freq$"]
        if self.tie_word_embeddings:
            ignore.append(r"^lm_head\.weight$")
        report = load_weights_by_mapping(self, weights, _MAPPINGS, ignore=ignore, rename=_to_ours)
        report.missing = [_to_checkpoint(name) for name in report.missing]
        return report
