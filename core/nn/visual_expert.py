"""Visual experts (CogVLM): every layer holds two sets of weights, the vision expert's for image
tokens and the language expert's for text tokens, and each token goes through its own set.

The rows of a flat batch are routed by a ``[T]`` bool mask (True: vision expert), which a model
derives from ``ForwardBatch.image_token_mask``; ``None`` (a step without image tokens) sends every
row to the language expert without any indexing. Both experts of a block have the same shapes and
are split over tensor-parallel ranks the same way (q/k/v by heads, MLP by intermediate features),
so a rank computes its slice for both kinds of rows, and a rowwise block reduces both kinds in
one all-reduce.

Each expert's layers are ordinary ``vlm.nn`` linears (``.language`` and ``.vision``), so they load
through their ``weight_loader`` s, pack for the CPU and quantize like every other linear.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.distributed import all_reduce
from vlm.nn.activation import SiluAndMul
from vlm.nn.linear import (
    PackableLinear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
)
from vlm.quantization import QuantConfig


def _routed(x: torch.Tensor, vision_rows: torch.Tensor | None, out_features: int, language, vision) -> torch.Tensor:
    """``language(rows)`` for text rows, ``vision(rows)`` for image rows, as one ``[T, out]`` tensor."""
    if vision_rows is None:
        return language(x)
    count = int(vision_rows.sum())
    if count == 0:  # an image step whose rows here are all text (e.g. only an image's last token)
        return language(x)
    if count == x.shape[0]:
        return vision(x)
    out = x.new_empty((x.shape[0], out_features))
    text_rows = ~vision_rows
    out[text_rows] = language(x[text_rows])
    out[vision_rows] = vision(x[vision_rows])
    return out


class VisualExpertQKV(nn.Module):
    """q, k and v in one GEMM per expert, split over ranks by heads (as ``build_qkv_proj``).

    ``forward(x, vision_rows)`` -> ``[T, (q_heads + 2 * kv_heads) * head_dim]`` of this rank.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        language_bias: bool = False,
        vision_bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        shape = (hidden_size, head_dim, num_heads, num_kv_heads)
        self.language = build_qkv_proj(
            *shape, bias=language_bias, dtype=dtype, device=device, quant_config=quant_config
        )
        self.vision = build_qkv_proj(*shape, bias=vision_bias, dtype=dtype, device=device, quant_config=quant_config)
        self.out_features = self.language.q_size + 2 * self.language.kv_size

    def forward(self, x: torch.Tensor, vision_rows: torch.Tensor | None) -> torch.Tensor:
        return _routed(x, vision_rows, self.out_features, self.language, self.vision)


class VisualExpertRowwiseLinear(nn.Module):
    """A rowwise linear per expert (attention output ``dense``): the input features are this
    rank's slice; both experts' partial sums are reduced in one all-reduce, biases added after."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        language_bias: bool = False,
        vision_bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.out_features = out_features
        self.language = build_rowwise_linear(
            in_features, out_features, bias=language_bias, dtype=dtype, device=device, quant_config=quant_config
        )
        self.vision = build_rowwise_linear(
            in_features, out_features, bias=vision_bias, dtype=dtype, device=device, quant_config=quant_config
        )

    @staticmethod
    def _partial(layer: PackableLinear):
        # this rank's share of the product, before the all-reduce and without the bias
        return lambda rows: layer.matmul(rows, None)

    def forward(self, x: torch.Tensor, vision_rows: torch.Tensor | None) -> torch.Tensor:
        out = all_reduce(
            _routed(x, vision_rows, self.out_features, self._partial(self.language), self._partial(self.vision))
        )
        return _add_biases(out, vision_rows, self.language.bias, self.vision.bias)


def _add_biases(
    out: torch.Tensor,
    vision_rows: torch.Tensor | None,
    language_bias: torch.Tensor | None,
    vision_bias: torch.Tensor | None,
) -> torch.Tensor:
    if vision_rows is None:
        return out if language_bias is None else out + language_bias
    if language_bias is not None:
        out[~vision_rows] += language_bias
    if vision_bias is not None:
        out[vision_rows] += vision_bias
    return out


class _GatedMLP(nn.Module):
    """One expert's SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, gate and up fused (shards 0, 1)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, device, quant_config):
        super().__init__()
        self.gate_up_proj = build_merged_colwise_linear(
            hidden_size, [intermediate_size, intermediate_size], dtype=dtype, device=device, quant_config=quant_config
        )
        self.down_proj = build_rowwise_linear(
            intermediate_size, hidden_size, dtype=dtype, device=device, quant_config=quant_config
        )
        self.act_fn = SiluAndMul()

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (before the all-reduce)."""
        return self.down_proj.matmul(self.act_fn(self.gate_up_proj(x)), None)


class VisualExpertMLP(nn.Module):
    """A SwiGLU MLP per expert (``.language``, ``.vision``, each with ``gate_up_proj`` and
    ``down_proj``, no biases); one all-reduce for both kinds of rows."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.language = _GatedMLP(hidden_size, intermediate_size, dtype, device, quant_config)
        self.vision = _GatedMLP(hidden_size, intermediate_size, dtype, device, quant_config)

    def forward(self, x: torch.Tensor, vision_rows: torch.Tensor | None) -> torch.Tensor:
        return all_reduce(_routed(x, vision_rows, self.hidden_size, self.language.partial, self.vision.partial))


__all__ = ["VisualExpertMLP", "VisualExpertQKV", "VisualExpertRowwiseLinear"]
