"""Every choice vlm makes by device (CPU or GPU), in one place, with the measurement behind it.

The engine, ``vlm.nn`` and ``vlm.kernels`` ask here instead of testing ``device.type`` themselves.
Each implementation choice has one environment variable, read on every call (tests flip them):

``VLM_KERNELS`` = ``auto`` | ``torch`` | ``triton``
    Which implementation of the fused ops in :mod:`vlm.kernels` runs. ``auto`` (default): Triton
    for CUDA tensors when triton is installed, the torch reference otherwise. ``triton`` forces
    the Triton kernels even on CPU tensors, which is how the tests run them under
    ``TRITON_INTERPRET=1``.
``VLM_CPU_PACKED_GEMM`` = ``1`` | ``0``
    Whether linear layers on CPU run through oneDNN's packed weight layout
    (:mod:`vlm.kernels.cpu_gemm`): fp32 weights, and bf16 / fp16 ones where the CPU computes that
    dtype natively (:func:`native_half_dtypes`). ``0`` turns it off, e.g. to compare; ``auto``
    then picks float32 on CPU, since half precision is fast only packed.

Defaults that depend on the device (each overridable by an engine setting):

- device: ``cuda`` when available, else ``cpu``;
- dtype: on CPU, the checkpoint's bf16 / fp16 where the CPU computes it natively, else float32
  (fp32 checkpoints stay fp32); on GPU, the checkpoint's dtype, else bfloat16. Measured with
  ``benchmarks/gemm_dtypes.py`` on 2 Zen 4 cores (AVX512_BF16; no AVX512_FP16, no AMX) on the
  Qwen2-0.5B shapes, weights not in cache: packed bf16 takes 0.50-0.60x packed fp32's time at 1
  row (17-25 GB/s of weights, fp32 19-30; a plain read runs at 31-33 GB/s), 0.52-0.55x at 8 rows,
  and reaches 410-430 GFLOP/s at 128 rows (fp32 190-215). Unpacked bf16 (``F.linear``) takes
  1.3-1.8x packed bf16's time below 128 rows. oneDNN refuses fp16 without AVX512_FP16 or
  AVX-NE-CONVERT, and unpacked fp16 runs at 42-49 GFLOP/s at 128 rows (a fifth of fp32), so
  there fp16 checkpoints load as fp32. End to end (``benchmarks/decode.py``'s model, 128 + 128
  tokens) bf16 decodes 18.2 tok/s at batch 1 (fp32 10.7) and 85.6 at batch 8 (fp32 76.0; bf16
  attention, 8x slower than fp32's in decode, takes back most of the GEMM's gain there);
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
    """The model's dtype: ``requested`` unless ``"auto"``.

    ``auto`` on CPU: the checkpoint's half dtype where this CPU computes it natively through the
    packed GEMM (:func:`native_half_dtypes`, with ``VLM_CPU_PACKED_GEMM`` on), else float32 (fp32
    checkpoints stay fp32). On GPU: the checkpoint's dtype, else bfloat16.
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    checkpoint: torch.dtype | None = getattr(torch, checkpoint_dtype) if checkpoint_dtype in _DTYPES else None
    if device.type != "cpu":
        return checkpoint if checkpoint is not None else torch.bfloat16
    if checkpoint is not None and checkpoint in native_half_dtypes() and _packed_gemm_switched_on():
        return checkpoint
    return torch.float32


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
    """Whether ``weight`` (a dense ``[out, in]`` linear weight) is repacked for oneDNN (``VLM_CPU_PACKED_GEMM``).

    fp32 weights always are; bf16 / fp16 ones where the CPU computes that dtype natively.
    """
    import torch

    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and (weight.dtype == torch.float32 or weight.dtype in native_half_dtypes())
        and _packed_gemm_switched_on()
    )


def _packed_gemm_switched_on() -> bool:
    import torch

    return os.environ.get(PACKED_GEMM_ENV, "1") != "0" and torch.backends.mkldnn.is_available()


@cache
def native_half_dtypes() -> tuple[torch.dtype, ...]:
    """The half dtypes this CPU's packed GEMM computes natively (bf16 first); empty where none.

    bf16 needs AVX512_BF16 or AMX-BF16 and fp16 AVX512_FP16, AVX-NE-CONVERT or AMX-FP16 (oneDNN
    runs bf16 on plain AVX-512 too, by emulation, slower than fp32); both need torch's AVX-512
    kernels (``torch.backends.cpu.get_cpu_capability()``) for the casts and elementwise ops around
    the GEMM, and a one-time probe that oneDNN's packed ops run in that dtype.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return ()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ()
    flags = cpu_flags()
    candidates = (
        (torch.bfloat16, {"avx512_bf16", "amx_bf16"}),
        (torch.float16, {"avx512_fp16", "avx_ne_convert", "amx_fp16"}),
    )
    return tuple(dtype for dtype, needs in candidates if flags & needs and _packed_gemm_runs(dtype))


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of interest here, from /proc/cpuinfo (Linux) and torch's own probes."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags.update(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    probes = {
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_bf16": "_is_amx_tile_supported",  # every CPU with AMX tiles so far has AMX-BF16
        "amx_fp16": "_is_amx_fp16_supported",
    }
    for flag, probe in probes.items():
        check = getattr(torch.cpu, probe, None)  # private: a torch build may lack them
        if check is not None and check():
            flags.add(flag)
    return frozenset(flags)


def _packed_gemm_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies a small ``dtype`` weight (and gets the right answer)."""
    import torch

    weight = torch.linspace(-1, 1, 24 * 40).reshape(24, 40)
    x = torch.linspace(1, -1, 3 * 40).reshape(3, 40)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 8)
        out = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
    except (AttributeError, RuntimeError):  # private ops, and oneDNN refuses what the CPU lacks
        return False
    expected = x.to(dtype).float() @ weight.to(dtype).float().T
    return out.dtype == dtype and torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2)
