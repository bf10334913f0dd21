"""int8 weight-only quantization: one symmetric scale per output channel (gpt-fast's int8 handler).

``w[n, k] ≈ q[n, k] * scale[n]`` with ``q`` in [-127, 127] and ``scale[n] = max_k |w[n, k]| / 127``,
so every weight is off by at most ``scale[n] / 2``. On CPU the GEMM is torch's
``_weight_int8pack_mm(x, q, scale)``, which reads the int8 weight as it is stored (no repacking),
in the dtype of the scales (:func:`vlm.quantization.base.cpu_kernel_dtype`). Where ``vlm.kernels``
takes the Triton path (CUDA tensors) the GEMM is its ``int8_weight_matmul``, which also reads the
codes as stored; elsewhere the weight is dequantized and multiplied with ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm import kernels
from vlm.quantization.base import QuantizedWeight, has_op

_OP = "_weight_int8pack_mm"
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch's vectorized (bf16) kernel reads 16 inputs at a time with no remainder loop and checks
# nothing: other input sizes return garbage or crash (torch 2.13, AVX-512)
_OP_IN_MULTIPLE = 16
#: rows quantized at a time (bounds the float temporaries)
_QUANTIZE_ROWS = 4096


def has_cpu_kernel(in_features: int) -> bool:
    """Whether torch's int8 CPU kernel takes layers with ``in_features`` inputs (else they
    dequantize their weight at every call)."""
    return in_features % _OP_IN_MULTIPLE == 0 and has_op(_OP)


class Int8Weight(QuantizedWeight):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """:param qweight: int8 ``[out, in]``. :param scales: ``[out]``, in the dtype the kernel
        computes in (it reads them in the activations' dtype)."""
        self.qweight, self.scales = qweight, scales
        self.out_features, self.in_features = qweight.shape

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if kernels.backend_for(x) == "triton":
            return kernels.int8_weight_matmul(x, self.qweight, self.scales, bias)
        compute = self.scales.dtype
        if not (x.device.type == "cpu" and compute in _OP_DTYPES and has_cpu_kernel(self.in_features)):
            return self.dense_matmul(x, bias)
        flat = x.reshape(-1, self.in_features).to(compute).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales).to(x.dtype)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def rows(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``indices`` of :meth:`dequantize` (``[*indices.shape, in]``), dequantizing only
        them: an embedding lookup in a table stored as this weight."""
        codes = F.embedding(indices, self.qweight).float()
        return (codes * self.scales.float()[indices].unsqueeze(-1)).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales]


def quantize(
    weight: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    row_absmax: torch.Tensor | None = None,
    largest_code: int = 127,
) -> Int8Weight:
    """Quantize a dense ``[out, in]`` weight.

    :param compute_dtype: the dtype the GEMM computes in and the scales are kept in (default:
        ``weight``'s).
    :param row_absmax: ``[out]``, each row's largest magnitude over the *whole* row, when
        ``weight`` holds a slice of its input features (a row-parallel layer's rank): every rank
        then uses the unsharded layer's scales and the shards are exactly its slices.
    :param largest_code: the code a row's largest magnitude maps to (127; W8A8 uses 63 on CPUs
        whose int8 dot products sum pairs in int16, :mod:`vlm.quantization.w8a8`).
    """
    dtype = compute_dtype or weight.dtype
    weight = weight.detach()
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    # a block of rows at a time: the float temporaries of a large matrix (an LM head) stay small
    for start in range(0, weight.shape[0], _QUANTIZE_ROWS):
        rows = slice(start, start + _QUANTIZE_ROWS)
        w = weight[rows].float()
        absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax[rows].float()
        # the codes are computed with the scales as stored, so that dequantizing reproduces exactly
        # what the kernel multiplies by; an all-zero row gets the smallest scale instead of 0 / 0
        scales[rows] = (absmax / largest_code).clamp(min=torch.finfo(dtype).tiny).to(dtype)
        qweight[rows] = torch.round(w / scales[rows].float()[:, None]).clamp_(-largest_code - 1, largest_code)
    return Int8Weight(qweight, scales)
