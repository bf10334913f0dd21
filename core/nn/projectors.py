"""Projectors from vision features to the language model's width, shared by VLM families.

Registered in ``vlm.registry.PROJECTORS``: ``MLPProjector`` (LLaVA's ``multi_modal_projector``:
Linear -> activation -> Linear), ``LayerNormMLPProjector`` (InternVL's: LayerNorm first) and
``GLUProjector`` (CogVLM's: Linear -> LayerNorm -> GELU, then SwiGLU), with
:func:`pixel_shuffle`, InternVL's space-to-depth that comes before it. Module names follow the
checkpoints' (``linear_1``, ``linear_2``, ``layer_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.nn.activation import get_act_fn
from vlm.nn.linear import build_replicated_linear
from vlm.nn.norm import LayerNorm


class MLPProjector(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(
        self, in_features: int, out_features: int, act: str = "gelu", bias: bool = True, dtype=None, device=None
    ):
        super().__init__()
        self.linear_1 = build_replicated_linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.act = get_act_fn(act)
        self.linear_2 = build_replicated_linear(out_features, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LayerNormMLPProjector(MLPProjector):
    """LayerNorm -> Linear -> activation -> Linear."""

    def __init__(
        self, in_features: int, out_features: int, act: str = "gelu", eps: float = 1e-5, dtype=None, device=None
    ):
        super().__init__(in_features, out_features, act, bias=True, dtype=dtype, device=device)
        self.layer_norm = LayerNorm(in_features, eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.layer_norm(x))


def pixel_shuffle(x: torch.Tensor, scale: float, v1: bool = False) -> torch.Tensor:
    """``[B, W, H, C]`` -> ``[B, W*scale, H*scale, C/scale^2]`` (InternVL's space-to-depth)."""
    b, w, h, c = x.shape
    x = x.reshape(b, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(b, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x if v1 else x.permute(0, 2, 1, 3).contiguous()


class GLUProjector(nn.Module):
    """``linear -> LayerNorm -> GELU``, then SwiGLU ``dense_4h_to_h(silu(gate_proj(x)) * dense_h_to_4h(x))``."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int, dtype, device):
        super().__init__()
        self.linear_proj = build_replicated_linear(in_features, hidden_size, dtype=dtype, device=device)
        self.norm1 = LayerNorm(hidden_size, 1e-5, dtype=dtype, device=device)  # torch's default eps
        self.act1 = get_act_fn("gelu")
        self.gate_proj = build_replicated_linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.dense_h_to_4h = build_replicated_linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.dense_4h_to_h = build_replicated_linear(intermediate_size, hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))
