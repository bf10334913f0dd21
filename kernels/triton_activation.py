"""Triton gated activations: silu_and_mul (SwiGLU) and gelu_and_mul (GeGLU).

The MLP's gate and up projections come out of one matmul as [..., 2d]; fusing
the activation with the multiply reads that once and writes [..., d] once.
Grid: (row, block of d columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import GELU_APPROXIMATIONS, check_gated_args

MAX_BLOCK = 1024


@triton.jit
def _gated_act_kernel(
    x_ptr,  # [rows, 2d], unit stride along the last dim
    out_ptr,  # [rows, d] contiguous
    x_row_stride,
    d,
    ACTIVATION: tl.constexpr,  # "silu" | "gelu" | "gelu_tanh"
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)

    if ACTIVATION == "silu":
        act = gate * tl.sigmoid(gate)
    elif ACTIVATION == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # 1/sqrt(2)
    else:
        # gelu_tanh = 0.5 * x * (1 + tanh(u)) and 0.5 * (1 + tanh(u)) == sigmoid(2u),
        # so no tanh is needed (triton has none on every backend) and the
        # result saturates cleanly: exp overflowing to inf gives x / inf = 0.
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi) * (...)
        act = gate / (1.0 + tl.exp(-2.0 * u))

    tl.store(out_ptr + row * d + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED = isinstance(_gated_act_kernel, InterpretedFunction)


def _launch(x: torch.Tensor, activation: str, block_size: int | None) -> torch.Tensor:
    d = check_gated_args(x)
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, 2 * d)
    block = block_size or min(triton.next_power_of_2(d), MAX_BLOCK)
    grid = (x2.shape[0], triton.cdiv(d, block))
    _gated_act_kernel[grid](
        x2, out, x2.stride(0), d, ACTIVATION=activation, BLOCK=block, num_warps=min(max(block // 256, 1), 4)
    )
    return out


def silu_and_mul(x: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
    """Triton version of ``reference.silu_and_mul``. block_size is for tests."""
    return _launch(x, "silu", block_size)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", *, block_size: int | None = None) -> torch.Tensor:
    """Triton version of ``reference.gelu_and_mul``. block_size is for tests."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_and_mul: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return _launch(x, "gelu" if approximate == "none" else "gelu_tanh", block_size)
