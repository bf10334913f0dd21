"""Plain-torch reference implementations of the fused ops in ``vlm.kernels``.

These are the CPU path and the ground truth the Triton kernels are tested
against, so they favour the obvious formula over speed. Every op computes in
fp32 and returns the input dtype; where HF models round an intermediate to the
model dtype (Llama's RMSNorm, the residual add) we round at the same place, so
that swapping HF modules for these ops does not change results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "gelu_and_mul",
    "apply_rotary",
    "mrope_section_rows",
    "apply_mrope",
]


# --------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------


def check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [H] matching x's last dim; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, bit-compatible in spirit with HF LlamaRMSNorm.

    HF normalizes in fp32, rounds to the input dtype and only then multiplies
    by the weight; rounding before the multiply is part of what checkpoints
    were trained with, so we keep it.
    """
    check_norm_args(x, weight)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual; out = rms_norm(new_residual)``.

    The sum is rounded to x.dtype before normalizing: that rounded tensor is
    the residual stream the next layer sees, so the norm must see it too.
    Inputs are not modified; both results are new tensors.
    """
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


# --------------------------------------------------------------------------
# Gated activations (the MLP's gate/up projections come out concatenated)
# --------------------------------------------------------------------------


def check_gated_args(x: torch.Tensor) -> int:
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"gated activation: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    return x.shape[-1] // 2


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> silu(x[..., :d]) * x[..., d:]  (SwiGLU)."""
    d = check_gated_args(x)
    gate, up = x[..., :d].float(), x[..., d:].float()
    # in place on silu's fresh output: one pass and one [.., d] buffer fewer (prefill is large)
    return F.silu(gate).mul_(up).to(x.dtype)


GELU_APPROXIMATIONS = ("none", "tanh")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2d] -> gelu(x[..., :d]) * x[..., d:]  (GeGLU).

    ``approximate="tanh"`` is the gelu_pytorch_tanh variant used by Gemma and
    SigLIP-style towers; ``"none"`` is the exact erf form.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_and_mul: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    d = check_gated_args(x)
    gate, up = x[..., :d].float(), x[..., d:].float()
    return F.gelu(gate, approximate=approximate).mul_(up).to(x.dtype)


# --------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------


def check_rotary_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """Validate shapes and return the rotary dim R (= 2 * cos.shape[-1])."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"apply_rotary: q and k must be [T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != T:
        raise ValueError(
            f"apply_rotary: cos and sin must both be [T, R/2] with T={T}; "
            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    rotary_dim = 2 * cos.shape[1]
    if not 0 < rotary_dim <= D:
        raise ValueError(f"apply_rotary: rotary dim {rotary_dim} (2 * cos.shape[-1]) must be in (0, {D}]")
    return rotary_dim


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    # cos/sin are per token; broadcast over heads.
    cos = cos.float()[:, None, :]
    sin = sin.float()[:, None, :]
    xf = x.float()
    rot, passthrough = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if is_neox:
        # HF rotate_half: the two halves of the rotary slice form the pairs.
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        # GPT-J: adjacent elements (0,1), (2,3), ... form the pairs.
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rot, passthrough], dim=-1).to(x.dtype)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first R dims of every head of q [T, Hq, D] and k [T, Hk, D].

    cos, sin: [T, R/2], already gathered at each token's position. Dims
    R..D pass through unchanged (partial rotary, e.g. rotary_pct=0.5).
    is_neox selects the pairing: halves (Llama/Qwen) or interleaved (GPT-J).
    """
    rotary_dim = check_rotary_args(q, k, cos, sin)
    return _rotate(q, cos, sin, rotary_dim, is_neox), _rotate(k, cos, sin, rotary_dim, is_neox)


# --------------------------------------------------------------------------
# Multimodal rotary (M-RoPE, Qwen2-VL)
# --------------------------------------------------------------------------


def mrope_section_rows(mrope_section: list[int] | tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Which position row (0 temporal, 1 height, 2 width) each rotary frequency reads: [R/2] int32.

    Qwen2-VL splits the R/2 frequencies into consecutive sections and section i takes its angle
    from position row i % 3 (transformers' ``recomposition_frequencies``).
    """
    rows = [i % 3 for i, size in enumerate(mrope_section) for _ in range(int(size))]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def check_mrope_args(positions: torch.Tensor, cos_table: torch.Tensor, section_rows: torch.Tensor) -> None:
    if positions.dim() != 2 or positions.shape[0] != 3:
        raise ValueError(f"apply_mrope: positions must be [3, T]; got {tuple(positions.shape)}")
    if cos_table.dim() != 2 or section_rows.shape != (cos_table.shape[1],):
        raise ValueError(
            f"apply_mrope: section_rows must have one entry per frequency (cos_table [P, R/2] = "
            f"{tuple(cos_table.shape)}); got {tuple(section_rows.shape)}: mrope_section must sum to R/2"
        )


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    section_rows: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding with 3-D positions: frequency j of token t rotates by the angle of
    ``positions[section_rows[j], t]``, read from the per-position tables cos/sin_table [P, R/2]."""
    check_mrope_args(positions, cos_table, section_rows)
    rows = section_rows.long()
    token_positions = positions.long()[rows]  # [R/2, T]: the position each frequency uses
    freq = torch.arange(rows.shape[0], device=positions.device)[:, None]
    cos = cos_table[token_positions, freq].T
    sin = sin_table[token_positions, freq].T
    return apply_rotary(q, k, cos, sin, is_neox)
