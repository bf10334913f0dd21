"""int4 weight-only quantization, group-wise with zero points (gpt-fast's int4 handler).

Each group of ``group_size`` consecutive input features of an output row has its own scale and
zero point, in the convention of torch's "tinygemm" kernels::

    w ≈ (q - 8) * scale + zero,   q in [0, 15],   scale = (max - min) / 15,   zero = min + 8 * scale

so ``q = round((w - min) / scale)`` and every weight is off by at most ``scale / 2``.

Two layouts:

- :class:`Int4Weight`, the portable one: codes two per byte (the even input feature in the low
  nibble), scales and zeros ``[out, in / group_size]``. Its GEMM is ``vlm.kernels``'
  ``int4_weight_matmul`` where that takes the Triton path (CUDA tensors), which reads the packed
  codes; elsewhere it dequantizes and calls ``F.linear``.
- :class:`Int4CpuWeight`, torch's CPU kernel's: ``_convert_weight_to_int4pack_for_cpu`` packs the
  codes (``[out, in / 2]`` bytes, interleaved for the CPU's vector width) and
  ``_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`` reads the scales and zeros
  as one ``[in / group_size, out, 2]`` tensor in the dtype it computes in
  (:func:`vlm.quantization.base.cpu_kernel_dtype`). It wants ``out`` a multiple of 16: other
  layers get zero rows, cut from the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm import kernels
from vlm.quantization.base import QuantizedWeight, has_op
from vlm.quantization.config import QuantizationError

_PACK_OP = "_convert_weight_to_int4pack_for_cpu"
_MM_OP = "_weight_int4pack_mm_for_cpu"
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP_GROUP_SIZES = (32, 64, 128, 256)
_OP_OUT_MULTIPLE = 16


def _unpack(qweight: torch.Tensor) -> torch.Tensor:
    """Two codes per byte -> one per int32 (``[out, in / 2]`` -> ``[out, in]``)."""
    low, high = qweight & 0x0F, qweight >> 4
    return torch.stack([low, high], dim=-1).reshape(qweight.shape[0], -1).to(torch.int32)


class Int4Weight(QuantizedWeight):
    """The portable layout (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        """:param qweight: uint8 ``[out, in / 2]``. :param scales: :param zeros: ``[out, in / group_size]``."""
        self.qweight, self.scales, self.zeros, self.group_size = qweight, scales, zeros, group_size
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """The codes ``q``, int32 ``[out, in]``."""
        return _unpack(self.qweight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if kernels.backend_for(x) == "triton":
            return kernels.int4_weight_matmul(x, self.qweight, self.scales, self.zeros, self.group_size, bias)
        return self.dense_matmul(x, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.codes().view(self.out_features, -1, self.group_size).float()
        w = (groups - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales, self.zeros]

    def for_cpu_kernel(self, compute_dtype: torch.dtype) -> Int4CpuWeight | None:
        """This weight in torch's CPU kernel layout, computing in ``compute_dtype``, or None where
        the kernel does not apply (another device or dtype, a torch build without it)."""
        if not (
            self.qweight.device.type == "cpu"
            and compute_dtype in _OP_DTYPES
            and self.group_size in _OP_GROUP_SIZES
            and has_op(_PACK_OP)
            and has_op(_MM_OP)
        ):
            return None
        pad = -self.out_features % _OP_OUT_MULTIPLE
        codes, scales, zeros = self.codes(), self.scales, self.zeros
        if pad:  # zero rows: code 8 with scale 0 and zero 0 dequantizes to 0
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        # the second argument (inner k tiles) only matters to the CUDA layout
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(compute_dtype)
        return Int4CpuWeight(packed, scales_and_zeros, self.group_size, self.out_features)


class Int4CpuWeight(QuantizedWeight):
    """torch's CPU kernel layout (see the module docstring); built by :meth:`Int4Weight.for_cpu_kernel`."""

    def __init__(
        self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int
    ) -> None:
        self.packed, self.scales_and_zeros, self.group_size = packed, scales_and_zeros, group_size
        self.out_features, self.in_features = out_features, packed.shape[1] * 2
        self.padded = packed.shape[0] != out_features

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()
        out = self._kernel(flat).to(x.dtype)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], self.out_features)

    def _kernel(self, flat: torch.Tensor, scales_and_zeros: torch.Tensor | None = None) -> torch.Tensor:
        scales_and_zeros = self.scales_and_zeros if scales_and_zeros is None else scales_and_zeros
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, scales_and_zeros)
        return out[:, : self.out_features].contiguous() if self.padded else out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # the packed layout is the kernel's own (it differs between AVX-512, AVX2 and plain
        # builds), so the weight is read back through the kernel: row j of the identity times
        # W.T is exactly column j of W.T (1 * w plus zeros), as the kernel dequantizes it. In
        # fp32 (the packing does not depend on the dtype), so that nothing is rounded to bf16.
        eye = torch.eye(self.in_features, dtype=torch.float32)
        return self._kernel(eye, self.scales_and_zeros.float()).t().contiguous().to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]


def quantize(weight: torch.Tensor, group_size: int = 128, compute_dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantize a dense ``[out, in]`` weight into the portable layout.

    :param compute_dtype: the dtype the kernel reads the scales and zeros in (default:
        ``weight``'s): they are rounded to it before the codes are computed from them.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise QuantizationError(f"{in_features} input features are not a whole number of int4 groups of {group_size}")
    dtype = compute_dtype or weight.dtype
    groups = weight.detach().float().reshape(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    # a constant group gets the smallest scale instead of 0 (its codes are then all 0)
    scales = ((high - low) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype).float()
    zeros = (low + 8 * scales).to(dtype).float()
    codes = torch.round((groups - (zeros - 8 * scales)[..., None]) / scales[..., None]).clamp_(0, 15)
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Int4Weight(qweight.contiguous(), scales, zeros, group_size)
