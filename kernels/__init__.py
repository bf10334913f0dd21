"""Fused ops for the model code: RMSNorm, gated activations, rotary embedding,
attention over the paged KV cache (cache write, decode, prefill), and GEMMs on
int8 / int4 weight-only quantized weights.

Each op dispatches on its input: CUDA tensors run the Triton kernel, anything
else runs the torch reference in ``vlm.kernels.reference`` (attention: the
torch implementation in ``vlm.kernels.torch_attention``). The environment
variable ``VLM_KERNELS`` (see :mod:`vlm.platform`) overrides that choice:

    auto    (default) Triton for CUDA tensors when triton is installed, else torch
    torch   always the reference
    triton  always Triton, even for CPU tensors; this is how the tests run the
            kernels without a GPU, under TRITON_INTERPRET=1

The variable is read on every call so tests can flip it with monkeypatch.

Triton is imported lazily, on the first call that takes the Triton path:
``import vlm.kernels`` stays cheap and works without triton installed, and
TRITON_INTERPRET (which triton reads when a kernel is *defined*) still takes
effect if it is set after this package was imported but before the first
Triton call.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from vlm.platform import KERNELS_ENV, kernel_backend

from . import reference, torch_attention

__all__ = [
    "backend_for",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "gelu_and_mul",
    "apply_rotary",
    "apply_mrope",
    "write_kv_cache",
    "paged_decode_attention",
    "paged_prefill_attention",
    "int8_weight_matmul",
    "int4_weight_matmul",
]

ENV_VAR = KERNELS_ENV


def backend_for(tensor: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"``: the path an op on ``tensor`` takes."""
    return kernel_backend(tensor)


def _triton_module(name: str, tensor: torch.Tensor) -> ModuleType:
    """Import ``vlm.kernels.<name>`` (which imports triton) on first use."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        if exc.name != "triton" and not (exc.name or "").startswith("triton."):
            raise
        raise ImportError(
            f"The Triton kernel path was selected ({ENV_VAR}={os.environ.get(ENV_VAR, 'auto')}) "
            f"but triton is not importable ({exc}). Install triton or set {ENV_VAR}=torch."
        ) from exc
    # Without the interpreter, a CPU pointer reaching a compiled kernel fails
    # deep inside triton with a message that does not say what to do.
    if not tensor.is_cuda and not module.INTERPRETED:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got a tensor on {tensor.device}. "
            f"Set {ENV_VAR}=torch, or set TRITON_INTERPRET=1 before the first Triton "
            f"call to run the kernels on CPU in triton's (slow) interpreter."
        )
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H]; returns x.dtype."""
    if backend_for(x) == "triton":
        return _triton_module("triton_norm", x).rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)`` as new tensors."""
    if backend_for(x) == "triton":
        return _triton_module("triton_norm", x).fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    if backend_for(x) == "triton":
        return _triton_module("triton_activation", x).silu_and_mul(x)
    return reference.silu_and_mul(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2d] -> gelu(x[..., :d], approximate) * x[..., d:]; approximate is "none" or "tanh"."""
    if backend_for(x) == "triton":
        return _triton_module("triton_activation", x).gelu_and_mul(x, approximate)
    return reference.gelu_and_mul(x, approximate)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on q [T, Hq, D] and k [T, Hk, D] with cos, sin [T, R/2].

    Only the first R dims of each head rotate. is_neox: rotate_half pairing
    (Llama/Qwen) if True, interleaved GPT-J pairing if False.
    """
    if backend_for(q) == "triton":
        return _triton_module("triton_rotary", q).apply_rotary(q, k, cos, sin, is_neox)
    return reference.apply_rotary(q, k, cos, sin, is_neox)


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    section_rows: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary (Qwen2-VL's M-RoPE) on q [T, Hq, D] and k [T, Hk, D].

    positions [3, T] holds each token's temporal, height and width position; frequency j reads
    row section_rows[j] (``reference.mrope_section_rows(mrope_section)``) and takes its angle from
    the per-position tables cos_table, sin_table [max_position, R/2].
    """
    if backend_for(q) == "triton":
        return _triton_module("triton_rotary", q).apply_mrope(
            q, k, cos_table, sin_table, positions, section_rows, is_neox
        )
    return reference.apply_mrope(q, k, cos_table, sin_table, positions, section_rows, is_neox)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hk, D] in place at flat slots slot_mapping [T] (block * block_size + offset)
    of the paged caches [num_blocks, block_size, Hk, D]."""
    if backend_for(k) == "triton":
        return _triton_module("triton_attention", k).write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return torch_attention.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] over each sequence's context_lens [B] cached
    tokens, found through block_tables [B, max_blocks]; GQA when Hq is a multiple of Hk. With
    sliding_window W, only the last W tokens."""
    window: dict[str, Any] = {} if sliding_window is None else {"sliding_window": sliding_window}
    if backend_for(q) == "triton":
        return _triton_module("triton_attention", q).paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, **window
        )
    return torch_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, **window)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    query_spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for prompt chunks: sequence i owns q[query_start_loc[i]:query_start_loc[i+1]],
    the last of its context_lens[i] cached tokens (bottom-right aligned causal mask). query_spans
    [T, 2] gives each query a bidirectional span [start, end) of positions it also sees;
    sliding_window W hides keys <= query - W (``vlm.kernels.torch_attention``)."""
    # the mask options only when set: callers and stand-ins written before them keep working
    masks: dict[str, Any] = {}
    if sliding_window is not None:
        masks["sliding_window"] = sliding_window
    if query_spans is not None:
        masks["query_spans"] = query_spans
    if backend_for(q) == "triton":
        return _triton_module("triton_attention", q).paged_prefill_attention(
            q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, **masks
        )
    return torch_attention.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, **masks
    )


def int8_weight_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., in] @ W.T (+ bias)`` in x's dtype for the int8 weight ``W = qweight * scales[:, None]``
    (qweight int8 ``[out, in]``, scales ``[out]``; ``vlm.quantization.int8``). The Triton kernel
    reads the codes; the torch path dequantizes W and calls ``F.linear``."""
    if backend_for(x) == "triton":
        return _triton_module("triton_quant_matmul", x).int8_weight_matmul(x, qweight, scales, bias)
    return F.linear(x, (qweight.float() * scales.float()[:, None]).to(x.dtype), bias)


def int4_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W.T (+ bias)`` in x's dtype for the portable int4 layout of
    ``vlm.quantization.int4``: qweight uint8 ``[out, in / 2]`` (feature 2j in the low nibble of
    byte j), scales and zeros ``[out, in / group_size]``, ``W = (q - 8) * scale + zero``. The
    Triton kernel reads the packed codes; the torch path dequantizes W and calls ``F.linear``."""
    if backend_for(x) == "triton":
        return _triton_module("triton_quant_matmul", x).int4_weight_matmul(x, qweight, scales, zeros, group_size, bias)
    codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).view(qweight.shape[0], -1, group_size).float()
    weight = (codes - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return F.linear(x, weight.view(qweight.shape[0], -1).to(x.dtype), bias)
