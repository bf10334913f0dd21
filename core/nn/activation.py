"""Activations: gated ones (the input holds [gate, up] side by side, the output is act(gate) * up)
through ``vlm.kernels``, and the plain ones vision towers and projectors name in their configs
(:func:`get_act_fn`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm import kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gelu_and_mul(x, approximate=self.approximate)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELU(nn.Module):
    """GELU, exact (``approximate="none"``) or with PyTorch's tanh approximation (``"tanh"``)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class NewGELU(nn.Module):
    """The tanh approximation written out (transformers' ``gelu_new``); not bit-equal to ``GELU("tanh")``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu() -> GELU:
    """transformers' ``gelu``: exact."""
    return GELU("none")


def gelu_pytorch_tanh() -> GELU:
    """transformers' ``gelu_pytorch_tanh``: PyTorch's tanh approximation."""
    return GELU("tanh")


def get_act_fn(name: str) -> nn.Module:
    """The activation a config names (``"gelu"``, ``"quick_gelu"``, ...), computed as transformers
    does: ``vlm.registry.ACTIVATIONS.build(dict(type=name))``, where plugins may register more."""
    from vlm.registry import ACTIVATIONS

    if name not in ACTIVATIONS:
        known = ", ".join(sorted(n for n in ACTIVATIONS.module_dict if n.islower()))
        raise ValueError(f"unsupported activation {name!r}; vlm knows {known}")
    return ACTIVATIONS.build(dict(type=name))
