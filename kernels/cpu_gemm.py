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

oneDNN (through ideep) creates and caches a primitive, JIT code included, for every input shape
it meets, up to 1,024 per process. A server meets every row count from 1 to a full prefill step
(batches shrink and grow as requests come and go), so its memory grew by ~2 MiB a round of 64
requests for as long as it ran (benchmarks/soak.py: 526 -> 646 MiB over 40 rounds; flat without
packing). Rows are therefore padded up to a few bucket sizes (:func:`row_bucket`): exact up to 16,
multiples of 16 up to 128, of 64 above, so a layer meets about 30 shapes at most.
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


def row_bucket(rows: int) -> int:
    """The row count a packed GEMM of ``rows`` rows runs at (see the module docstring)."""
    if rows <= 16:
        return rows
    step = 16 if rows <= 128 else 64
    return -(-rows // step) * step


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``packed`` when there is one; the result is in ``x``'s dtype."""
    if packed is None:
        return F.linear(x, weight, bias)
    shape, dtype = x.shape, x.dtype
    rows = x.reshape(-1, shape[-1]).to(packed.dtype)  # oneDNN takes the weight's dtype
    count = rows.shape[0]
    bucket = row_bucket(count)
    rows = F.pad(rows, (0, 0, 0, bucket - count)) if bucket != count else rows.contiguous()
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    if bucket != count:
        out = out[:count]
    return out.view(*shape[:-1], out.shape[-1]).to(dtype)
