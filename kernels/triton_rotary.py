"""Triton rotary position embedding for q and k in one launch.

Grid: (token, block of heads). A program loads its token's cos/sin once and
applies them to BLOCK_H query heads and BLOCK_H key heads, so GQA (fewer k
heads than q heads) just leaves some of the k lanes masked off.

Within a head, the first R = 2 * cos.shape[-1] dims rotate in pairs and the
remaining D - R dims are copied through (partial rotary). The pairs are
(i, i + R/2) for neox / rotate_half models and (2i, 2i + 1) for GPT-J.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import check_mrope_args, check_rotary_args

# Heads per program is chosen so a program touches about this many pairs.
PAIRS_PER_PROGRAM = 2048


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,  # [T, n_heads, head_dim] contiguous
    tok,
    x_tok_stride,
    x_head_stride,
    n_heads,
    head_start,
    cos,  # [BLOCK_HALF] fp32, this token's
    sin,
    half,  # R / 2
    head_dim,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,  # 0 when R == head_dim
):
    heads = head_start + tl.arange(0, BLOCK_H)
    head_mask = heads < n_heads
    pairs = tl.arange(0, BLOCK_HALF)
    mask = head_mask[:, None] & (pairs < half)[None, :]
    if IS_NEOX:
        i1 = pairs
        i2 = pairs + half
    else:
        i1 = 2 * pairs
        i2 = 2 * pairs + 1

    x_heads = x_ptr + tok * x_tok_stride + heads[:, None] * x_head_stride
    out_heads = out_ptr + (tok * n_heads + heads[:, None]) * head_dim
    x1 = tl.load(x_heads + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_heads + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out_heads + i1[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_heads + i2[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask)

    if BLOCK_PASS > 0:
        # The output is a fresh tensor, so the non-rotary tail must be copied.
        dims = 2 * half + tl.arange(0, BLOCK_PASS)
        pass_mask = head_mask[:, None] & (dims < head_dim)[None, :]
        tail = tl.load(x_heads + dims[None, :], mask=pass_mask, other=0.0)
        tl.store(out_heads + dims[None, :], tail, mask=pass_mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,  # [T, half] contiguous
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_tok_stride,
    q_head_stride,
    k_tok_stride,
    k_head_stride,
    n_q_heads,
    n_k_heads,
    half,
    head_dim,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head_start = tl.program_id(1) * BLOCK_H
    pairs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + tok * half + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * half + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        tok,
        q_tok_stride,
        q_head_stride,
        n_q_heads,
        head_start,
        cos,
        sin,
        half,
        head_dim,
        IS_NEOX,
        BLOCK_H,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        tok,
        k_tok_stride,
        k_head_stride,
        n_k_heads,
        head_start,
        cos,
        sin,
        half,
        head_dim,
        IS_NEOX,
        BLOCK_H,
        BLOCK_HALF,
        BLOCK_PASS,
    )


@triton.jit
def _mrope_kernel(
    q_ptr,
    k_ptr,
    cos_table_ptr,  # [P, half] contiguous
    sin_table_ptr,
    positions_ptr,  # [3, T] contiguous int64
    section_rows_ptr,  # [half] int32: which positions row each frequency reads
    num_tokens,
    q_out_ptr,
    k_out_ptr,
    q_tok_stride,
    q_head_stride,
    k_tok_stride,
    k_head_stride,
    n_q_heads,
    n_k_heads,
    half,
    head_dim,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # Same as _rotary_kernel except that each frequency gathers its angle at its own
    # section's position, so the [T, half] cos/sin never exist in memory.
    tok = tl.program_id(0).to(tl.int64)
    head_start = tl.program_id(1) * BLOCK_H
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = pairs < half
    rows = tl.load(section_rows_ptr + pairs, mask=pair_mask, other=0).to(tl.int64)
    pos = tl.load(positions_ptr + rows * num_tokens + tok, mask=pair_mask, other=0)
    cos = tl.load(cos_table_ptr + pos * half + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_table_ptr + pos * half + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        tok,
        q_tok_stride,
        q_head_stride,
        n_q_heads,
        head_start,
        cos,
        sin,
        half,
        head_dim,
        IS_NEOX,
        BLOCK_H,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        tok,
        k_tok_stride,
        k_head_stride,
        n_k_heads,
        head_start,
        cos,
        sin,
        half,
        head_dim,
        IS_NEOX,
        BLOCK_H,
        BLOCK_HALF,
        BLOCK_PASS,
    )


INTERPRETED = isinstance(_rotary_kernel, InterpretedFunction)


def _launch(
    kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    heads_per_program: int | None,
    angle_args: tuple,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernel`` over (token, head block): the launch shared by rotary and M-RoPE, which
    differ only in where a token's angles come from (``angle_args`` lead the kernel's arguments)."""
    T, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 0
    block_h = heads_per_program or min(
        triton.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, PAIRS_PER_PROGRAM // block_half)
    )
    grid = (T, triton.cdiv(max(n_q_heads, n_k_heads), block_h))
    kernel[grid](
        q,
        k,
        *angle_args,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        n_q_heads,
        n_k_heads,
        half,
        head_dim,
        IS_NEOX=bool(is_neox),
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        num_warps=4,
    )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    is_neox: bool = True,
    *,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.apply_rotary``; returns new tensors.

    q and k may be strided views (e.g. slices of a fused qkv projection) as
    long as the head dim is contiguous. heads_per_program (a power of two) is
    for tests: fewer heads than Hq/Hk exercises the head-block masking.
    """
    rotary_dim = check_rotary_args(q, k, cos, sin)
    return _launch(_rotary_kernel, q, k, rotary_dim, is_neox, heads_per_program, (cos.contiguous(), sin.contiguous()))


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    section_rows: torch.Tensor,
    is_neox: bool = True,
    *,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.apply_mrope``; returns new tensors."""
    check_mrope_args(positions, cos_table, section_rows)
    rotary_dim = 2 * cos_table.shape[1]
    if (
        k.shape[0] != q.shape[0]
        or k.shape[2] != q.shape[2]
        or positions.shape[1] != q.shape[0]
        or not 0 < rotary_dim <= q.shape[2]
    ):
        raise ValueError(
            f"apply_mrope: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} and "
            f"cos_table {tuple(cos_table.shape)} disagree"
        )
    angle_args = (
        cos_table.contiguous(),
        sin_table.contiguous(),
        positions.to(torch.int64).contiguous(),
        section_rows.to(device=q.device, dtype=torch.int32).contiguous(),
        q.shape[0],
    )
    return _launch(_mrope_kernel, q, k, rotary_dim, is_neox, heads_per_program, angle_args)
