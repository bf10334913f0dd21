"""What every scheme's quantized weight offers a linear layer: its GEMM and its dequantized values."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cache

import torch
import torch.nn.functional as F


class QuantizedWeight(ABC):
    """A linear layer's ``[out, in]`` weight in a quantized layout, with the GEMM that reads it."""

    out_features: int
    in_features: int

    @abstractmethod
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` over the last dimension of ``x``, in ``x``'s dtype."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight the GEMM multiplies by (the fallback GEMM, and tests)."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor kept (for memory accounting)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dense_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The portable GEMM: dequantize, then ``F.linear`` (any device and dtype). On CPU it is
        not used where torch's kernels apply: it was slower than them at every size measured,
        up to 512 rows (benchmarks/quantization.py)."""
        return F.linear(x, self.dequantize(x.dtype), bias)


def cpu_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's int8 / int4 CPU kernels compute in for activations of ``dtype``.

    fp32 goes through bf16 on x86 (AVX2 / AVX-512): there torch vectorizes these kernels for bf16
    only and runs fp32 as a scalar loop, 5-50x slower than the bf16 kernel even with the casts
    (benchmarks/quantization.py). The price is bf16 rounding of the layer's input and output
    (8 significant bits), below the weights' own quantization error.
    """
    if dtype == torch.float32 and torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return torch.bfloat16
    return dtype


@cache
def has_op(name: str) -> bool:
    """Whether this torch build has ``torch.ops.aten.<name>`` (private ops come and go)."""
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True
