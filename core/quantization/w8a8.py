"""int8 weights and int8 activations (W8A8): the weights as :mod:`vlm.quantization.int8` quantizes
them (one symmetric scale per output channel), each input row quantized to 8 bits at run time.

Why: the int8 weight-only kernel (torch's ``_weight_int8pack_mm``) converts every weight to bf16
and multiplies in bf16, so it is bound by arithmetic, not by the bytes it reads (9-10 GB/s of
weights at batch 1, and slower than packed bf16 from 8 rows, NOTES.md "Issue 11"). Multiplying
int8 by int8 uses the CPU's integer dot products (AVX512-VNNI / AVX-VNNI / AMX), which is what
llama.cpp's Q8_0 does too (it quantizes activations to 8 bits per block of 32 for the dot
product). Measured on a Zen 4 (AVX512-VNNI), Qwen2-0.5B's shapes, 2 threads: the LM head at batch
1 5.4 ms (int8 weight-only 9.3, packed bf16 10.8); the MLP's gate/up projection at batch 16 0.36
ms (weight-only 1.9, packed bf16 0.76).

The kernel is fbgemm's dynamic quantized linear (``torch.ops.quantized.linear_dynamic``, torch's
``x86`` / ``fbgemm`` quantized engine), chosen over oneDNN's ``qlinear_pointwise`` (10-70% slower
here at 1-16 rows) and ``torch._int_mm`` (slower still). It quantizes its whole input with one
scale; to get one scale per row (per token, so that one token's large activations do not cost
the others their precision), each row is divided by its largest magnitude first and the output
row multiplied by it after: ``y = (W · (x / a)) · a`` is exact in real arithmetic.

Numerics: each activation is off by at most half a step of 2 / 255 of its row's largest magnitude
(fbgemm's asymmetric uint8 over [-1, 1]). On CPUs without int8 dot products (AVX2, AVX-512
without VNNI) fbgemm multiplies with ``vpmaddubsw``, which adds pairs of uint8 x int8 products in
int16 and saturates: 8-bit activations times 8-bit weights can reach 2 x 255 x 127 > 32767 and
were measured to come out halved. There the weights get 7 bits (codes in [-64, 63], 2 x 255 x 64
fits) and the activations keep 8: per-token activation ranges are what outliers widen, so losing
the bit on the per-channel weights costs less (a layer with an outlier feature: 4.4% error
against 8.2% with fbgemm's usual ``reduce_range`` 7-bit activations). Elsewhere (CUDA, or a torch
without the quantized engine) the layer falls back to the int8 weight-only GEMM with
full-precision activations.

torch has deprecated its quantized tensor type (pytorch issue 184982), which the prepacking
still takes; when it is removed, :func:`available` turns False and W8A8 layers run the weight-only
kernel.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import torch

from vlm.quantization.int8 import Int8Weight
from vlm.quantization.int8 import quantize as quantize_int8

#: the quantized engines whose dynamic linear is fbgemm's (x86: fbgemm for dynamic linears)
_ENGINES = ("x86", "fbgemm")
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@cache
def _engine() -> str | None:
    supported = torch.backends.quantized.supported_engines
    for engine in _ENGINES:
        if engine in supported:
            return engine
    return None


def available() -> bool:
    """Whether this torch has the CPU kernel (else W8A8 layers run the int8 weight-only GEMM)."""
    return _engine() is not None and hasattr(torch.ops.quantized, "linear_dynamic")


@cache
def largest_code() -> int:
    """The largest weight code: 63 where the CPU lacks int8 dot products (int16 pair sums, module
    docstring), else 127 as for the int8 scheme."""
    from vlm.platform import cpu_flags

    return 127 if cpu_flags() & _VNNI_FLAGS else 63


class W8A8Weight(Int8Weight):
    """An :class:`Int8Weight` whose CPU GEMM quantizes its input rows to int8 (module docstring).

    The int8 codes are also kept where rows are looked up (a tied embedding: :meth:`rows`);
    otherwise only fbgemm's packed copy is, and :attr:`qweight` unpacks it on demand.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, keep_codes: bool = False) -> None:
        super().__init__(qweight, scales)
        self.packed: Any = _prepack(qweight, scales)
        self._codes: torch.Tensor | None = qweight if keep_codes or self.packed is None else None

    @property
    def qweight(self) -> torch.Tensor:
        if self._codes is not None:
            return self._codes
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr()

    @qweight.setter
    def qweight(self, value: torch.Tensor) -> None:
        self._codes = value

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None or x.device.type != "cpu":
            return super().matmul(x, bias)
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] == 1:  # the kernel's one scale is this row's own (decode at batch 1)
            out = torch.ops.quantized.linear_dynamic(rows, self.packed, False)
        else:
            magnitude = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
            out = torch.ops.quantized.linear_dynamic(rows / magnitude, self.packed, False)
            out.mul_(magnitude)
        if bias is not None:
            out += bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        # fbgemm's packed copy holds one byte per weight, plus the codes where they are kept
        kept = [self.scales, torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")]
        return kept + ([self._codes] if self._codes is not None and self.packed is not None else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _prepack(qweight: torch.Tensor, scales: torch.Tensor) -> Any:
    """fbgemm's packed form of the codes, or None where the kernel does not apply."""
    if qweight.device.type != "cpu" or not available():
        return None
    engine = _engine()
    assert engine is not None
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        tensor = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(tensor, None)


def quantize(
    weight: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    row_absmax: torch.Tensor | None = None,
    keep_codes: bool = False,
) -> W8A8Weight:
    """Quantize a dense ``[out, in]`` weight as :func:`vlm.quantization.int8.quantize` does (same
    tensor-parallel rule; the same codes and scales except that on a CPU without int8 dot products
    the codes have 7 bits, :func:`largest_code`) and pack it for the W8A8 kernel.

    :param keep_codes: keep the int8 codes beside the packed copy (a tied embedding reads rows).
    """
    on_fbgemm = weight.device.type == "cpu" and available()
    base = quantize_int8(weight, compute_dtype, row_absmax, largest_code() if on_fbgemm else 127)
    return W8A8Weight(base.qweight, base.scales, keep_codes=keep_codes)
