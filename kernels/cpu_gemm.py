"""The GEMM every ``vlm.nn`` linear layer goes through, with a CPU fast path.

On CPU, ``F.linear`` on a row-major ``[out, in]`` weight reaches about half the memory
bandwidth in decode (few rows of input), and worse at 2-16 rows. oneDNN's packed weight layout
(``mkldnn._reorder_linear_weight``) roughly doubles decode throughput at every batch size
measured (see benchmarks/decode.py). After loading, :func:`prepare_for_inference` repacks each
linear layer's weight once; the dense copy is dropped, so memory does not grow. bf16 (fp16)
weights are packed too where the CPU computes that dtype natively, and take about half fp32's
time at every row count (benchmarks/gemm_dtypes.py); activations go in and come out in the
model's dtype (cast to the weight's and back), and oneDNN accumulates in fp32.

Whether a weight is packed is :func:`vlm.platform.packed_gemm_enabled` (``VLM_CPU_PACKED_GEMM``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vlm.platform import packed_gemm_enabled

# oneDNN picks the packed layout from an expected row count; 8 was best from 1 to 16 rows here
_PACK_ROWS_HINT = 8


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a dense ``[out, in]`` CPU weight, or None where not applicable.

    fp32 weights are packed, and bf16 / fp16 ones where the CPU computes them natively
    (:func:`vlm.platform.packed_gemm_enabled`).
    """
    if not packed_gemm_enabled(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_ROWS_HINT)
    except (AttributeError, RuntimeError) as exc:  # a private op: a torch build may lack it
        _warn_once(f"oneDNN weight packing unavailable ({exc}); using F.linear")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("vlm").warning(message)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``packed`` when there is one; the result is in ``x``'s dtype."""
    if packed is None:
        return F.linear(x, weight, bias)
    shape, dtype = x.shape, x.dtype
    rows = x.reshape(-1, shape[-1]).to(packed.dtype).contiguous()  # oneDNN takes the weight's dtype
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.view(*shape[:-1], out.shape[-1]).to(dtype)
