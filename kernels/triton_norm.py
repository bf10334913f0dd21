"""Triton RMSNorm and fused residual-add + RMSNorm.

One program normalizes one row. Rows up to MAX_BLOCK wide (every hidden size
of the models we serve) are held in registers and read once; wider rows loop
over BLOCK-sized chunks, once for the sum of squares and once to write.

Rounding matches ``reference``: the residual sum is rounded to the input dtype
before it is normalized, and the normalized row is rounded to the input dtype
before the weight multiply (as HF LlamaRMSNorm does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import check_norm_args

MAX_BLOCK = 8192


@triton.jit
def _load_row_chunk(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr):
    """Load x (+ residual) at cols as fp32; optionally write the residual sum."""
    h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        # Round to the model dtype: this is the residual stream the next layer
        # reads, and the norm must see exactly the same values.
        h = h.to(res_out_row.dtype.element_ty)
        if STORE_RESIDUAL:
            tl.store(res_out_row + cols, h, mask=mask)
        h = h.to(tl.float32)
    return h


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # only read when HAS_RESIDUAL
    weight_ptr,
    out_ptr,  # [rows, H] contiguous
    res_out_ptr,  # [rows, H] contiguous, only written when HAS_RESIDUAL
    x_row_stride,
    res_row_stride,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK >= H: the whole row fits in one chunk
):
    # int64 so row * stride cannot overflow on large batches.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    out_row = out_ptr + row * H
    res_out_row = res_out_ptr + row * H
    cols = tl.arange(0, BLOCK)

    if ONE_PASS:
        mask = cols < H
        h = _load_row_chunk(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL, True)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            c = start + cols
            h = _load_row_chunk(x_row, res_row, res_out_row, c, c < H, HAS_RESIDUAL, True)
            sum_sq += h * h
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / H + eps)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            # Recompute x + residual rather than reading back res_out: a load
            # is not guaranteed to see this program's earlier stores.
            h = _load_row_chunk(x_row, res_row, res_out_row, c, mask, HAS_RESIDUAL, False)
            w = tl.load(weight_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
            tl.store(out_row + c, y.to(out_ptr.dtype.element_ty), mask=mask)


# Triton picks interpreter or compiler when a kernel is defined; vlm.kernels
# checks this to give a clear error for CPU tensors on a compiled kernel.
INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View t as [rows, H] with unit stride along H, copying only if needed."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(x, residual, weight, eps, block_size):
    check_norm_args(x, weight)
    H = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, res_out

    x2 = _as_rows(x)
    res2 = _as_rows(residual) if residual is not None else x2
    weight = weight.contiguous()
    block = block_size or min(triton.next_power_of_2(H), MAX_BLOCK)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        weight,
        out,
        res_out,
        x2.stride(0),
        res2.stride(0),
        H,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        ONE_PASS=block >= H,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, block_size: int | None = None) -> torch.Tensor:
    """Triton version of ``reference.rms_norm``. block_size (a power of two) is
    for tests: a block narrower than H exercises the chunked path."""
    return _launch(x, None, weight, eps, block_size)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.fused_add_rms_norm``; returns new tensors."""
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    return _launch(x, residual, weight, eps, block_size)
