"""Rotary position embedding (RoPE), neox or GPT-J style, full or partial, 1-D or multimodal.

Inverse frequencies come from transformers' rope initialisers for scaled variants (linear,
llama3, yarn, longrope), so long-context checkpoints rotate exactly as in transformers. The
cos/sin table is built once per model for all positions and indexed per step.

Multimodal rope (Qwen2-VL's M-RoPE) needs no other layer: when the config's rope parameters name an
``mrope_section`` and the engine passes ``[3, T]`` positions (temporal, height, width), each
section of the frequencies rotates by its own row's position. ``[T]`` positions still work (all
three rows equal), so a language model serves its VLM and itself with one module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm import kernels
from vlm.errors import ConfigError


def _rope_parameters(hf_config: Any | None) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def _inv_freq(rotary_dim: int, base: float, hf_config: Any | None) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default", "mrope"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
            known = ", ".join(sorted({"default", "mrope", *ROPE_INIT_FUNCTIONS} - {"dynamic"}))
            raise ConfigError(
                f"config.json rope_scaling type {rope_type!r} is not supported (supported: {known}); "
                "fix or remove rope_scaling"
            )

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        return inv_freq.float(), float(attention_scaling)
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)), 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place of position.

    :param head_dim: size of one head; ``rotary_dim`` (default ``head_dim``) of it rotates.
    :param is_neox: halves style (Llama, Qwen) when true, interleaved pairs (GPT-J) when false.
    :param hf_config: the text config, read for ``rope_parameters`` / ``rope_scaling``.
    """

    inv_freq: torch.Tensor

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
        self.mrope_section = _rope_parameters(hf_config).get("mrope_section")
        self._section_rows: torch.Tensor | None = None
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)} but the rotary "
                f"dimension {self.rotary_dim} needs {self.rotary_dim // 2}; fix rope_scaling.mrope_section in config.json"
            )

    def _table(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.device != device or self._cos.shape[0] < length:
            length = max(length, self.max_position)
            positions = torch.arange(length, dtype=torch.float, device=device)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            self._cos = freqs.cos() * self.attention_scaling
            self._sin = freqs.sin() * self.attention_scaling
        assert self._sin is not None
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T]`` positions -> cos, sin of shape ``[T, rotary_dim // 2]`` (fp32)."""
        cos, sin = self._table(positions.device, int(positions.max()) + 1 if positions.numel() else 1)
        return cos[positions], sin[positions]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[T, Hq, D]``, k ``[T, Hk, D]`` -> rotated copies; positions ``[T]`` or ``[3, T]`` (M-RoPE)."""
        if positions.dim() == 2:
            return self._forward_mrope(positions, q, k)
        cos, sin = self.cos_sin(positions)
        return kernels.apply_rotary(q, k, cos, sin, is_neox=self.is_neox)

    def _forward_mrope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mrope_section is None:
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} need multimodal rope, but the text config "
                "has no rope_scaling.mrope_section"
            )
        cos, sin = self._table(positions.device, int(positions.max()) + 1 if positions.numel() else 1)
        if self._section_rows is None or self._section_rows.device != positions.device:
            self._section_rows = kernels.reference.mrope_section_rows(self.mrope_section, positions.device)
        return kernels.apply_mrope(q, k, cos, sin, positions, self._section_rows, is_neox=self.is_neox)
