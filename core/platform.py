"""Every choice vlm makes by device (CPU or GPU), in one place, with the measurement behind it.

The engine, ``vlm.nn`` and ``vlm.kernels`` ask here instead of testing ``device.type`` themselves.
Each implementation choice has one environment variable, read on every call (tests flip them):

``VLM_KERNELS`` = ``auto`` | ``torch`` | ``triton``
    Which implementation of the fused ops in :mod:`vlm.kernels` runs. ``auto`` (default): Triton
    for CUDA tensors when triton is installed, the torch reference otherwise. ``triton`` forces
    the Triton kernels even on CPU tensors, which is how the tests run them under
    ``TRITON_INTERPRET=1``.
``VLM_CPU_PACKED_GEMM`` = ``1`` | ``0``
    Whether fp32 linear layers on CPU run through oneDNN's packed weight layout
    (:mod:`vlm.kernels.cpu_gemm`; about twice ``F.linear``'s decode throughput here). ``0`` turns
    it off, e.g. to compare.

Defaults that depend on the device (each overridable by an engine setting):

- device: ``cuda`` when available, else ``cpu``;
- dtype: float32 on CPU (no native bf16 GEMM on the CPUs measured: fp32 is the fast dtype),
  the checkpoint's dtype (else bfloat16) on GPU;
- tokens per forward step: 512 on CPU, where larger steps overflow the caches (prefilling 8 x 283
  tokens: 466-475 tok/s in 512-token steps, 340-372 in 2048-token steps), 2048 on GPU;
- images per vision-tower pass: one on CPU (InternViT: 2.13 s per tile alone, 2.51 s per tile
  in a batch of 7), all of a step's images on GPU.

This module imports torch only inside the functions that need a tensor or device.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KERNELS_ENV = "VLM_KERNELS"
KERNEL_BACKENDS = ("auto", "torch", "triton")
PACKED_GEMM_ENV = "VLM_CPU_PACKED_GEMM"

_DTYPES = ("float32", "bfloat16", "float16")


def default_device(requested: str = "auto") -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def default_dtype(device: torch.device, requested: str = "auto", checkpoint_dtype: str | None = None) -> torch.dtype:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, checkpoint_dtype) if checkpoint_dtype in _DTYPES else torch.bfloat16


def default_step_tokens(device: torch.device) -> int:
    """Tokens in one forward step when ``max_num_batched_tokens`` is not set."""
    return 512 if device.type == "cpu" else 2048


def vision_batches(device: torch.device, images: list) -> list[list]:
    """How a step's images are grouped into vision-tower passes."""
    if device.type == "cpu":
        return [[image] for image in images]
    return [images] if images else []


def kernel_backend(tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"``: the implementation an op on ``tensor`` takes (``VLM_KERNELS``)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_BACKENDS:
        raise ValueError(
            f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} is not a valid kernel backend; "
            f"expected one of {', '.join(KERNEL_BACKENDS)}"
        )
    if value != "auto":
        return value
    return "triton" if tensor.is_cuda and triton_installed() else "torch"


@cache
def triton_installed() -> bool:
    # find_spec looks for the package without importing it (importing triton costs ~1 s)
    return importlib.util.find_spec("triton") is not None


def packed_gemm_enabled(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (a dense ``[out, in]`` linear weight) is repacked for oneDNN (``VLM_CPU_PACKED_GEMM``)."""
    import torch

    return (
        os.environ.get(PACKED_GEMM_ENV, "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )
