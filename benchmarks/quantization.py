"""Weight-only quantized GEMMs vs the unquantized path, on the Qwen2-0.5B linear shapes, CPU.

For each (in, out) shape and row count it times y = x @ W^T (x in ``--activations``, fp32 by
default, as vlm runs on CPU) with:

- ``packed``: oneDNN's packed weight in the activations' dtype (``vlm.kernels.cpu_gemm``, the
  unquantized path);
- ``int8 fp32`` / ``int8 bf16``: ``torch.ops.aten._weight_int8pack_mm`` (per-channel scales)
  computing in fp32 / in bf16 (x cast to bf16 and the result back, as ``vlm.quantization`` does);
- ``int4 fp32`` / ``int4 bf16``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group size
  ``--group-size``), likewise;
- ``int8 deq`` / ``int4 deq``: dequantize the weight, then ``F.linear`` (the portable fallback,
  and the candidate for long inputs, where one dequantization serves many rows);

then prints microseconds per call and each variant's speed-up over ``packed``. The fp32 kernels
are skipped above ``--slow-max-rows`` rows (on x86 they are scalar loops: seconds per call).
``vlm.quantization.base.cpu_kernel_dtype`` comes from these numbers.

Each timed call reads a different copy of the weight, cycling through copies that together exceed
the last-level cache several times over, as a decode step does (it reads every layer once).

    python benchmarks/quantization.py
    python benchmarks/quantization.py --batch 1 8 16 64 512 --activations bf16
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlm.quantization import int4, int8

# (in_features, out_features) of the Qwen2-0.5B linears as vlm fuses them
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (896, 1152),
    "o_proj": (896, 896),
    "gate_up": (896, 9728),
    "down": (4864, 896),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
PACK_ROWS_HINT = 8  # as vlm.kernels.cpu_gemm
VARIANTS = ("packed", "int8 fp32", "int8 bf16", "int4 fp32", "int4 bf16", "int8 deq", "int4 deq")


def cpu_description() -> str:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    present = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "none of interest"
    return (
        f"CPU {model}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}\ncpuinfo flags: {present}"
    )


def make_call(
    variant: str, dtype: torch.dtype, in_features: int, out_features: int, batch: int, group_size: int, budget: int
) -> Callable[[int], torch.Tensor]:
    """A function of a copy index that runs one GEMM on that copy of the weight (x in ``dtype``)."""
    x = torch.randn(batch, in_features).to(dtype)
    scheme, _, mode = variant.partition(" ")
    compute = DTYPES.get(mode, dtype)  # the dtype the kernel runs in
    calls: list[Callable[[], torch.Tensor]] = []
    size = 0
    while size < budget or not calls:
        dense = (torch.randn(out_features, in_features) * 0.02).to(dtype)
        call: Callable[[], torch.Tensor]
        if variant == "packed":
            packed = torch.ops.mkldnn._reorder_linear_weight(dense, PACK_ROWS_HINT)
            call = lambda p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
            size += dense.numel() * dense.element_size()
        elif scheme == "int8":
            q8 = int8.quantize(dense, compute_dtype=compute)
            if mode == "deq":
                call = lambda q=q8: q.dense_matmul(x, None)  # noqa: E731
            else:
                call = lambda q=q8: torch.ops.aten._weight_int8pack_mm(x.to(compute), q.qweight, q.scales).to(dtype)  # noqa: E731
            size += q8.nbytes()
        else:
            portable = int4.quantize(dense, group_size, compute_dtype=compute)
            if mode == "deq":
                call = lambda q=portable: q.dense_matmul(x, None)  # noqa: E731
                size += portable.nbytes()
            else:
                q4 = portable.for_cpu_kernel(compute)
                if q4 is None:
                    raise RuntimeError("torch's int4 CPU kernel does not apply here")
                call = lambda q=q4: q._kernel(x.to(compute)).to(dtype)  # noqa: E731
                size += q4.nbytes()
        calls.append(call)
    return lambda i: calls[i % len(calls)]()


def time_call(call: Callable[[int], torch.Tensor], min_seconds: float, repeats: int) -> float:
    """Median seconds per call over ``repeats`` rounds of enough calls to last ``min_seconds``."""
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < min_seconds:  # warm-up, and sizes a round
        call(calls)
        calls += 1
    per_round = max(1, round(calls * min_seconds / (time.perf_counter() - start)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(per_round):
            call(i)
        samples.append((time.perf_counter() - start) / per_round)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 64, 128, 512])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--activations", choices=list(DTYPES), default="fp32", help="dtype of x (and of the output)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    parser.add_argument("--slow-max-rows", type=int, default=16, help="run the fp32 kernels up to this many rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=0.05, help="length of one timed round")
    parser.add_argument("--cache-mb", type=int, default=128, help="weight copies cycled through per variant")
    parser.add_argument(
        "--warmup-seconds", type=float, default=15, help="busy time before measuring (the first ~10 s ran slow here)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.activations]
    print(cpu_description())
    warmup = make_call("packed", dtype, 896, 896, 8, 0, args.cache_mb << 20)
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < args.warmup_seconds:
        warmup(i)
        i += 1
    print(f"activations {args.activations}, int4 group size {args.group_size}")
    print(f"\nmicroseconds per call (speed-up over {args.activations} packed)")
    print(f"{'shape':>8} {'in x out':>10} {'rows':>4} " + " ".join(f"{v:>15}" for v in args.variants))
    for shape in args.shapes:
        in_features, out_features = SHAPES[shape]
        for batch in args.batch:
            seconds: dict[str, float] = {}
            for variant in args.variants:
                seconds[variant] = math.nan
                if variant.endswith("fp32") and batch > args.slow_max_rows:
                    continue
                try:
                    call = make_call(
                        variant, dtype, in_features, out_features, batch, args.group_size, args.cache_mb << 20
                    )
                    seconds[variant] = time_call(call, args.round_seconds, args.repeats)
                    del call
                except RuntimeError as exc:
                    print(f"n/a {variant}: {str(exc).splitlines()[0]}")
            base = seconds.get("packed", math.nan)
            cells = [
                "-" if math.isnan(seconds[v]) else f"{seconds[v] * 1e6:.0f} ({base / seconds[v]:.2f}x)"
                for v in args.variants
            ]
            print(f"{shape:>8} {f'{in_features}x{out_features}':>10} {batch:>4} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
