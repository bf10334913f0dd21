"""Gated activations: the input holds [gate, up] side by side, the output is act(gate) * up."""

from __future__ import annotations

import torch
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
