"""The one GEMM every linear layer goes through, with a CPU fast path.

On CPU, ``F.linear`` on a row-major ``[out, in]`` weight reaches about half the memory
bandwidth in decode (few rows of input), and worse at 2-16 rows. oneDNN's packed weight layout
(``mkldnn._reorder_linear_weight``) roughly doubles decode throughput at every batch size
measured (see benchmarks/decode.py). After loading, :func:`prepare_for_inference` repacks each
linear layer's fp32 weight once; the dense copy is dropped, so memory does not grow.

``VLM_CPU_PACKED_GEMM=0`` turns the fast path off (e.g. to compare).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks the packed layout from an expected row count; 8 was best from 1 to 16 rows here
_PACK_ROWS_HINT = 8


def packing_enabled(weight: torch.Tensor) -> bool:
    return (
        os.environ.get("VLM_CPU_PACKED_GEMM", "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a dense ``[out, in]`` fp32 CPU weight, or None where not applicable."""
    if not packing_enabled(weight):
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), packed, bias, "none", [], "")
    return out.view(*shape[:-1], out.shape[-1])


class PackableLinear(nn.Module):
    """Base of the ``vlm.nn`` linears: holds ``weight`` / ``bias`` and the optional packed weight."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.packed_weight: torch.Tensor | None = None

    def prepare_for_inference(self) -> None:
        packed = pack_weight(self.weight)
        if packed is not None:
            self.packed_weight = packed
            # the dense copy is no longer read; keep the parameter (for names and shapes) but free it
            self.weight.data = torch.empty((0, self.weight.shape[1]), dtype=self.weight.dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, self.weight, bias, self.packed_weight)


def prepare_for_inference(model: nn.Module) -> None:
    """Call every submodule's ``prepare_for_inference`` once weights are loaded."""
    for module in model.modules():
        prepare = getattr(module, "prepare_for_inference", None)
        if prepare is not None and module is not model:
            prepare()
