"""Activations: gated ones (the input holds [gate, up] side by side, the output is act(gate) * up)
through ``vlm.kernels``, and the plain ones vision towers and projectors name in their configs
(:func:`get_act_fn`)."""

from __future__ import annotations

import math
from collections.abc import Callable

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


#: transformers' ``hidden_act`` / ``projector_hidden_act`` names -> the same function here
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": lambda: GELU("none"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "gelu_new": NewGELU,
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
}


def get_act_fn(name: str) -> nn.Module:
    """The activation a config names (``"gelu"``, ``"quick_gelu"``, ...), computed as transformers does."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; vlm knows {', '.join(sorted(_ACTIVATIONS))}") from None
