"""Triton GEMMs on weight-only quantized weights: ``x @ W.T (+ bias)`` reading the int8 / int4
codes as they are stored (``vlm.quantization``'s layouts) and dequantizing tiles in registers, so
the dense weight never exists in memory.

Kernels
-------
Both: grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))`` over the ``M = prod(x.shape[:-1])`` rows and
``N`` output features, row tiles fastest (programs that share a weight tile run together, so it
is read from DRAM about once). A program walks the ``K`` input features in ``BLOCK_K`` steps with
an fp32 ``[BLOCK_M, BLOCK_N]`` accumulator fed by ``tl.dot``; rows, columns and features past the
ends are masked (x and the codes load as 0), so no size needs to be a multiple of a block.
Decode (1 row) pads the row tile to 16 through that masking: the GEMV is bound by reading the
weight, and that is what the kernel minimizes.

``int8_weight_matmul``
    ``w[n, k] = q[n, k] * scale[n]``: the codes (exact in fp16 / bf16) go into the dot as they
    are, and the per-output-channel scale multiplies the accumulator once at the end.
``int4_weight_matmul``
    ``w = (q - 8) * scale + zero`` per group of ``group_size`` input features; two codes per byte,
    the even feature in the low nibble. A byte tile ``[BLOCK_K / 2, BLOCK_N]`` is loaded once and
    split into its low and high nibbles, dequantized in fp32 and rounded to x's dtype (as
    ``Int4Weight.dequantize(x.dtype)`` does), and multiplied by x's even and odd features: two
    dots with K = BLOCK_K / 2. When ``BLOCK_K`` divides ``group_size`` (the default: BLOCK_K is at
    most the group size) a tile lies in one group and reads one scale and zero per column;
    otherwise (``SCALE_PER_TILE`` false) they are gathered per feature pair.

Block sizes (constexpr; defaults picked for real GPUs but not tuned on one, since none was
available when this was written): up to 16 rows ``16 x 32 x 128`` (more programs over N for the
weight-bound GEMV), up to 64 rows ``BLOCK_M`` 32 / 64 with ``BLOCK_N`` 64 and ``BLOCK_K`` 64,
more rows ``64 x 128 x 64``; int4's ``BLOCK_K`` at most the group size. Tests pass smaller blocks
so that the interpreter crosses several tiles on small shapes.

Precision: fp32 accumulator; fp16 / bf16 operands go into ``tl.dot`` as they are (tensor cores),
fp32 ones with ``input_precision="ieee"`` (not TF32). Under the interpreter bf16 dots are wrong,
so there bf16 operands are upcast to fp32 in-kernel (``DOT_FP32``), as in ``triton_attention``.
The output is x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _int8_matmul_kernel(
    x_ptr,  # [M, K], unit stride along K
    w_ptr,  # int8 [N, K]
    scale_ptr,  # [N]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_s,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + rk < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, q.to(x_ptr.dtype.element_ty), acc)  # |q| <= 128: exact in fp16 / bf16
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    scale = tl.load(scale_ptr + rn * stride_s, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_matmul_kernel(
    x_ptr,  # [M, K], unit stride along K
    w_ptr,  # uint8 [N, K / 2]: feature 2j in the low nibble of byte j, 2j + 1 in the high one
    scale_ptr,  # [N, K / GROUP_SIZE]
    zero_ptr,  # [N, K / GROUP_SIZE]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,  # BLOCK_K divides GROUP_SIZE: one scale and zero per column and tile
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # input features per step (even); BLOCK_K / 2 bytes
):
    HALF: tl.constexpr = BLOCK_K // 2
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)  # byte (feature pair) within the tile
    m_mask = rm < M
    n_mask = rn < N
    half_k = K // 2
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + 2 * rj[None, :]  # even features
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rj[:, None] * stride_wk
    s_row = scale_ptr + rn.to(tl.int64) * stride_sn
    z_row = zero_ptr + rn.to(tl.int64) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j_mask = k0 // 2 + rj < half_k
        x_mask = m_mask[:, None] & j_mask[None, :]
        w_mask = j_mask[:, None] & n_mask[None, :]
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=x_mask, other=0.0)
        packed = tl.load(w_ptrs, mask=w_mask, other=0)
        if SCALE_PER_TILE:
            group = k0 // GROUP_SIZE
            scale = tl.load(s_row + group * stride_sg, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            zero = tl.load(z_row + group * stride_zg, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:  # a pair (2j, 2j + 1) never straddles two groups: GROUP_SIZE is even
            group = (k0 + 2 * rj) // GROUP_SIZE
            scale = tl.load(s_row[None, :] + group[:, None] * stride_sg, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_row[None, :] + group[:, None] * stride_zg, mask=w_mask, other=0.0).to(tl.float32)
        # masked codes dequantize to something nonzero, but they meet x == 0
        w_even = ((packed & 0xF).to(tl.float32) - 8.0) * scale + zero
        w_odd = ((packed >> 4).to(tl.float32) - 8.0) * scale + zero
        if DOT_FP32:
            acc = tl.dot(x_even.to(tl.float32), w_even, acc, input_precision="ieee")
            acc = tl.dot(x_odd.to(tl.float32), w_odd, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, w_even.to(x_ptr.dtype.element_ty), acc)
            acc = tl.dot(x_odd, w_odd.to(x_ptr.dtype.element_ty), acc)
        x_ptrs += BLOCK_K
        w_ptrs += HALF * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Triton picks interpreter or compiler when a kernel is defined; vlm.kernels
# checks this to give a clear error for CPU tensors on a compiled kernel.
INTERPRETED = isinstance(_int8_matmul_kernel, InterpretedFunction)


def _default_blocks(rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``rows`` rows (see the module docstring)."""
    if rows <= 16:
        return 16, 32, 128
    if rows <= 64:
        return (32 if rows <= 32 else 64), 64, 64
    return 64, 128, 64


def _check_block(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


def _prepare(
    what: str, x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check x and bias; return x as rows ``[M, in]`` (unit stride along in) and the output ``[M, out]``."""
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what}: x must be [..., {in_features}], got {tuple(x.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{what}: bias must be [{out_features}], got {tuple(bias.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, in_features)
    out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
    return rows, out


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 operands take the fp32 dot; bf16 dots are wrong in the interpreter, so upcast there.
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def int8_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T (+ bias)`` for x ``[..., in]``, qweight int8 ``[out, in]``,
    scales ``[out]``; returns ``[..., out]`` in x's dtype. The block sizes (powers of two >= 16)
    are for tests."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(
            f"int8_weight_matmul: qweight must be int8 [out, in], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    out_features, in_features = qweight.shape
    if scales.shape != (out_features,):
        raise ValueError(f"int8_weight_matmul: scales must be [{out_features}], got {tuple(scales.shape)}")
    rows, out = _prepare("int8_weight_matmul", x, in_features, out_features, bias)
    M = rows.shape[0]
    if M and out_features:
        bm, bn, bk = _default_blocks(M)
        bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
        for name, value in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
            _check_block(name, value, 16)
        grid = (triton.cdiv(M, bm), triton.cdiv(out_features, bn))
        _int8_matmul_kernel[grid](
            rows,
            qweight,
            scales,
            bias if bias is not None else scales,
            out,
            M,
            out_features,
            in_features,
            rows.stride(0),
            qweight.stride(0),
            qweight.stride(1),
            scales.stride(0),
            HAS_BIAS=bias is not None,
            DOT_FP32=_dot_fp32(x.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=4,
            num_stages=3,
        )
    return out.view(*x.shape[:-1], out_features)


def int4_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the portable int4 layout (``vlm.quantization.int4.Int4Weight``):
    qweight uint8 ``[out, in / 2]``, scales and zeros ``[out, in / group_size]``,
    ``W = (q - 8) * scale + zero``; returns ``[..., out]`` in x's dtype. The block sizes (powers of
    two; ``block_k`` >= 32, in input features) are for tests."""
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(
            f"int4_weight_matmul: qweight must be uint8 [out, in / 2], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
    if group_size <= 0 or group_size % 2 or in_features % group_size:
        raise ValueError(
            f"int4_weight_matmul: group_size must be even and divide the {in_features} input features, got {group_size}"
        )
    groups = (out_features, in_features // group_size)
    if scales.shape != groups or zeros.shape != groups:
        raise ValueError(
            f"int4_weight_matmul: scales and zeros must be {list(groups)}, "
            f"got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    rows, out = _prepare("int4_weight_matmul", x, in_features, out_features, bias)
    M = rows.shape[0]
    if M and out_features:
        bm, bn, bk = _default_blocks(M)
        # at most the group size (a tile in one group), at least 32 (two dots with K >= 16)
        bk = max(32, min(bk, triton.next_power_of_2(group_size)))
        bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
        for name, value, minimum in (("block_m", bm, 16), ("block_n", bn, 16), ("block_k", bk, 32)):
            _check_block(name, value, minimum)
        grid = (triton.cdiv(M, bm), triton.cdiv(out_features, bn))
        _int4_matmul_kernel[grid](
            rows,
            qweight,
            scales,
            zeros,
            bias if bias is not None else scales,
            out,
            M,
            out_features,
            in_features,
            rows.stride(0),
            qweight.stride(0),
            qweight.stride(1),
            scales.stride(0),
            scales.stride(1),
            zeros.stride(0),
            zeros.stride(1),
            GROUP_SIZE=group_size,
            SCALE_PER_TILE=group_size % bk == 0,
            HAS_BIAS=bias is not None,
            DOT_FP32=_dot_fp32(x.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=4,
            num_stages=3,
        )
    return out.view(*x.shape[:-1], out_features)


__all__ = ["int8_weight_matmul", "int4_weight_matmul", "INTERPRETED"]
