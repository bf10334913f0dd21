"""A transformers model class run by vlm's engine.

The model is the transformers class itself (``Idefics3ForConditionalGeneration``,
``Phi3ForCausalLM``, ...), built from the checkpoint's config on the engine's device and dtype.
Its language model's attention goes through an attention function registered with transformers'
``AttentionInterface`` (:func:`paged_attention`): transformers computes q, k and v (projections,
rotary, norms) as it always does and hands them over; the function writes k and v into vlm's paged
KV cache and attends with ``vlm.nn.Attention``. The engine's flat multi-request batch is a batch of
one sequence of ``T`` tokens for transformers: everything but attention is per token, and
attention reads the engine's :class:`~vlm.nn.ForwardBatch`, which travels to it as a keyword
argument of the language model's forward (transformers passes such keyword arguments down to its
attention functions). The vision tower keeps transformers' own (SDPA) attention.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vlm.nn import ForwardBatch
from vlm.nn.attention import Attention
from vlm.nn.linear import build_replicated_linear
from vlm.nn.weights import LoadReport
from vlm.plugin import ConfigError, ImageInput, VlmError
from vlm_plugin_transformers.families import model_class_name, refusal

#: the name vlm's paged attention is registered under in transformers' AttentionInterface
ATTENTION_IMPLEMENTATION = "vlm_paged"
#: the keyword argument that carries the engine's ForwardBatch down to the attention function
BATCH_KWARG = "vlm_batch"


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over vlm's paged KV cache.

    ``query`` ``[1, Hq, T, D]``, ``key`` / ``value`` ``[1, Hk, T, D]`` (rotary applied) -> ``[1, T, Hq, D]``.
    The causal mask, bidirectional spans and the layer's sliding window come from the engine's
    batch metadata and the layer, never from ``attention_mask`` (none is built for this function).
    """
    batch: ForwardBatch | None = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise VlmError(
            f"the {ATTENTION_IMPLEMENTATION!r} attention runs only inside vlm's engine (no ForwardBatch was passed); "
            "build the model with vlm's transformers fallback"
        )
    owner = type(module).__name__
    if softcap is not None or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise VlmError(f"{owner} soft-caps its attention or uses attention sinks, which vlm's attention kernels do not")
    if key.shape[-2] != query.shape[-2]:
        raise VlmError(f"{owner} attends to other states than its own tokens (cross-attention); vlm cannot page it")
    attention = _paged_layer(module, query.shape[1], key.shape[1], query.shape[-1], scaling, sliding_window)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = attention(q, k, v, batch)  # [T, Hq * D]
    return out.view(1, out.shape[0], query.shape[1], query.shape[-1]), None


def _paged_layer(
    module: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None, window: int | None
) -> Attention:
    """The ``vlm.nn.Attention`` of one transformers attention module (made on its first call)."""
    attention = getattr(module, "_vlm_attention", None)
    if attention is None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise VlmError(f"{type(module).__name__} has no layer_idx, so vlm cannot tell which KV cache is its own")
        attention = Attention(num_heads, head_dim, num_kv_heads, layer_idx, scale=scale, sliding_window=window)
        object.__setattr__(module, "_vlm_attention", attention)  # not a submodule: it holds no weights
    return attention


def register_attention() -> None:
    """Make :func:`paged_attention` known to transformers (idempotent). No mask function is
    registered for it, so transformers builds no attention mask: the engine's metadata is the mask."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, paged_attention)


def _no_init() -> Any:
    """A context in which transformers allocates parameters without initialising them (the
    checkpoint overwrites them; random init of a large model costs seconds)."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


class TransformersModel(nn.Module):
    """A transformers ``*ForCausalLM`` / ``*ForConditionalGeneration`` behind vlm's model protocol.

    :param hf_config: the checkpoint's config (a ``transformers.PretrainedConfig``).
    :param dtype: parameter dtype; :param device: where to allocate (``meta`` for ``vlmrun check``).
    """

    def __init__(self, hf_config: Any, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        import transformers

        reason = refusal(hf_config)
        if reason is not None:
            raise ConfigError(f"vlm-plugin-transformers cannot serve this model: {reason}")
        name = model_class_name(hf_config)
        model_class = getattr(transformers, name or "", None)
        if model_class is None:
            raise ConfigError(f"transformers {transformers.__version__} has no class {name!r}; upgrade transformers")
        register_attention()
        config = copy.deepcopy(hf_config)
        with torch.device(device), _no_init():
            self.hf = model_class._from_config(config, dtype=dtype)
        self.hf.eval()
        self.family = f"{getattr(hf_config, 'model_type', '?')} ({name})"
        self.language_model = self.hf.get_decoder()
        # only the language model pages its attention; the vision tower keeps transformers' own
        self.language_model.config._attn_implementation = ATTENTION_IMPLEMENTATION
        self.text_config = self.language_model.config
        self.lm_head = self.hf.get_output_embeddings()
        self.vocab_size = self.hf.get_input_embeddings().num_embeddings
        # multimodal rope (Qwen2-VL): the engine passes [3, T] positions
        rope = getattr(self.text_config, "rope_parameters", None) or getattr(self.text_config, "rope_scaling", None)
        self.position_dims = 3 if isinstance(rope, dict) and rope.get("mrope_section") else 1

    # -- the model protocol

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an image placeholder outside the vocabulary (Gemma 3, PaliGemma) embeds as token 0, as
        # transformers does; the core writes the image features over it
        ids = input_ids.masked_fill(input_ids >= self.vocab_size, 0)
        return self.hf.get_input_embeddings()(ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: ForwardBatch,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_ids = positions[None] if positions.dim() == 1 else positions[:, None]  # [1, T] or [3, 1, T]
        out = self.language_model(
            inputs_embeds=inputs_embeds[None],
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
            **{BATCH_KWARG: batch},
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states).float()
        # the final-logit transforms transformers' *ForCausalLM heads apply after lm_head
        text = self.text_config
        if getattr(text, "final_logit_softcapping", None) is not None:
            cap = float(text.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        if getattr(text, "logit_scale", None) is not None:  # Cohere
            logits = logits * float(text.logit_scale)
        if getattr(text, "logits_scaling", None) is not None:  # Granite
            logits = logits / float(text.logits_scaling)
        return logits

    def embed_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image through the model's own ``get_image_features`` (tower + projector)."""
        features = []
        accepted = self._image_feature_arguments()
        for image in images:
            extra = {
                k: v.to(image.pixel_values.device)
                for k, v in image.extra.items()
                if isinstance(v, torch.Tensor) and k in accepted
            }
            out = self.hf.get_image_features(pixel_values=image.pixel_values, **extra, return_dict=True)
            pooled = getattr(out, "pooler_output", out)
            if isinstance(pooled, (list, tuple)):
                pooled = torch.cat(list(pooled))
            features.append(pooled.reshape(-1, pooled.shape[-1]))
        return features

    def _image_feature_arguments(self) -> set[str]:
        """The processor outputs ``get_image_features`` takes besides the pixels (e.g.
        ``pixel_attention_mask``, ``image_grid_thw``); others (``num_crops``) stay out."""
        parameters = inspect.signature(self.hf.get_image_features).parameters
        return {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def _use_packable_linears(self) -> None:
        """Swap transformers' ``nn.Linear`` layers for :func:`packable` ones: plain ``F.linear``
        runs at a fraction of the packed GEMM's speed on CPU (measured: the fallback at batch 16
        0.9x ``generate`` before, with ``aten::mm`` 79% of the step)."""
        for parent in list(self.hf.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, packable(child))
        self.lm_head = self.hf.get_output_embeddings()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Load a checkpoint as transformers' ``from_pretrained`` does: its renamings and weight
        conversions for this model class, then the tied weights."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        state_dict = dict(weights)
        parameter = next(self.hf.parameters())
        config = LoadStateDictConfig(
            dtype=parameter.dtype,
            device_map={"": parameter.device},
            weight_mapping=get_model_conversion_mapping(self.hf, None, None),  # type: ignore[arg-type]
        )
        from transformers.utils import logging as transformers_logging

        # vlm's loader shows its own progress: no second bar from transformers
        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(self.hf, state_dict, config)
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        self.hf.tie_weights()
        self._use_packable_linears()
        tied = set(getattr(self.hf, "all_tied_weights_keys", None) or ())
        missing = sorted(k for k in info.missing_keys if k not in tied)
        return LoadReport(
            loaded=len(state_dict),
            missing=missing,
            unexpected=sorted(info.unexpected_keys),
            mismatched=sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.mismatched_keys),
        )


def packable(linear: nn.Linear) -> nn.Module:
    """A ``vlm.nn`` linear over the same weights, which the loader packs for the CPU GEMM (oneDNN)
    and then frees its own dense copy of (a new ``Parameter`` over the same storage: a tied
    embedding keeps its table)."""
    layer = build_replicated_linear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype, device="meta"
    )
    layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


__all__ = ["ATTENTION_IMPLEMENTATION", "TransformersModel", "paged_attention", "register_attention"]
