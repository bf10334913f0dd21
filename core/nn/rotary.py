"""Rotary position embedding (RoPE), neox or GPT-J style, full or partial.

Inverse frequencies come from transformers' rope initialisers for scaled variants (linear,
llama3, yarn, longrope), so long-context checkpoints rotate exactly as in transformers. The
cos/sin table is built once per model for all positions and indexed per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm import kernels


def _inv_freq(rotary_dim: int, base: float, hf_config: Any | None) -> tuple[torch.Tensor, float]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        if rope_type == "dynamic":
            raise NotImplementedError("dynamic NTK rope scaling is not supported; remove rope_scaling or use yarn")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        return inv_freq.float(), float(attention_scaling)
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)), 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place of position.

    :param head_dim: size of one head; ``rotary_dim`` (default ``head_dim``) of it rotates.
    :param is_neox: halves style (Llama, Qwen) when true, interleaved pairs (GPT-J) when false.
    :param hf_config: the text config, read for ``rope_parameters`` / ``rope_scaling``.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float = 10000.0,
        rotary_dim: int | None = None,
        is_neox: bool = True,
        hf_config: Any | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.max_position = max_position
        self.is_neox = is_neox
        inv_freq, self.attention_scaling = _inv_freq(self.rotary_dim, base, hf_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.device != device or self._cos.shape[0] < length:
            length = max(length, self.max_position)
            positions = torch.arange(length, dtype=torch.float, device=device)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            self._cos = freqs.cos() * self.attention_scaling
            self._sin = freqs.sin() * self.attention_scaling
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T]`` positions -> cos, sin of shape ``[T, rotary_dim // 2]`` (fp32)."""
        cos, sin = self._table(positions.device, int(positions.max()) + 1 if positions.numel() else 1)
        return cos[positions], sin[positions]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[T, Hq, D]``, k ``[T, Hk, D]`` -> rotated copies."""
        cos, sin = self.cos_sin(positions)
        return kernels.apply_rotary(q, k, cos, sin, is_neox=self.is_neox)
