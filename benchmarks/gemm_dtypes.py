"""CPU GEMM throughput by weight dtype and layout: y = x @ W^T on the Qwen2-0.5B decode shapes.

For each (in, out) shape and row count it times ``F.linear`` on a dense ``[out, in]`` weight and
oneDNN's packed layout (``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``, the path
of ``vlm.kernels.cpu_gemm``) in fp32, bf16 and fp16, and prints GB/s of weight read at batch 1
(decode is bound by memory bandwidth there) and GFLOP/s at the largest batch (bound by compute).

Each timed call reads a different copy of the weight, cycling through copies that together exceed
the last-level cache several times over, as a decode step does (it reads 24 layers of weights once
each): otherwise the small shapes would be served from cache and overstate the bandwidth.

    python benchmarks/gemm_dtypes.py
    python benchmarks/gemm_dtypes.py --batch 1 8 --threads 2 --json gemm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# (in_features, out_features) of the Qwen2-0.5B linears as vlm fuses them
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (896, 1152),
    "o_proj": (896, 896),
    "gate_up": (896, 9728),
    "down": (4864, 896),
    "lm_head": (896, 151936),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_bf16", "amx_fp16")
PACK_ROWS_HINT = 8  # as vlm.kernels.cpu_gemm
DISTURBED = 0.1  # a timing is marked '!' when other processes used more cores than this meanwhile


@dataclass
class Result:
    shape: str
    in_features: int
    out_features: int
    batch: int
    variant: str  # e.g. "bf16 packed"
    seconds: float  # median per call; nan where the variant does not run
    others: float = float("nan")  # cores other processes used meanwhile: over DISTURBED, rerun
    error: str = ""

    @property
    def weight_gbs(self) -> float:
        itemsize = DTYPES[self.variant.split()[0]].itemsize
        return self.in_features * self.out_features * itemsize / self.seconds / 1e9

    @property
    def gflops(self) -> float:
        return 2 * self.batch * self.in_features * self.out_features / self.seconds / 1e9


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
    probes = {
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "amx_fp16": torch.cpu._is_amx_fp16_supported(),
        "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "mkldnn_fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    }
    return (
        f"CPU {model}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}\n"
        f"cpuinfo flags: {present}\n"
        f"torch probes: {' '.join(f'{name}={value}' for name, value in probes.items())}"
    )


def make_call(
    packed: bool, dtype: torch.dtype, in_features: int, out_features: int, batch: int, budget_bytes: int
) -> Callable[[int], torch.Tensor]:
    """A function of a copy index that runs one GEMM on that copy of the weight."""
    copies = max(1, math.ceil(budget_bytes / (in_features * out_features * dtype.itemsize)))
    x = torch.randn(batch, in_features).to(dtype)
    weights = []
    for _ in range(copies):
        dense = (torch.randn(out_features, in_features) * 0.02).to(dtype)
        weights.append(torch.ops.mkldnn._reorder_linear_weight(dense, PACK_ROWS_HINT) if packed else dense)
    if packed:
        return lambda i: torch.ops.mkldnn._linear_pointwise(x, weights[i % copies], None, "none", [], "")
    return lambda i: F.linear(x, weights[i % copies])


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (Linux), nan elsewhere."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def time_call(call: Callable[[int], torch.Tensor], min_seconds: float, repeats: int) -> tuple[float, float]:
    """Median seconds per call over ``repeats`` rounds of enough calls to last ``min_seconds``, and
    how many cores other processes used meanwhile (on average; nan where unknown)."""
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < min_seconds:  # warm-up, and sizes a round
        call(calls)
        calls += 1
    per_round = max(1, round(calls * min_seconds / (time.perf_counter() - start)))
    samples = []
    wall, own, busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(per_round):
            call(i)
        samples.append((time.perf_counter() - start) / per_round)
    others = busy_cpu_seconds() - busy - (time.process_time() - own)
    return statistics.median(samples), others / (time.perf_counter() - wall)


def cell(result: Result, big: int) -> str:
    """Microseconds per call, with [GB/s] at batch 1 and [GFLOP/s] at the largest batch."""
    if result.error:
        return "n/a"
    text = f"{result.seconds * 1e6:.0f}"
    if result.batch == 1:
        text += f" [{result.weight_gbs:.1f}]"
    elif result.batch == big:
        text += f" [{result.gflops:.0f}]"
    return text + ("!" if result.others > DISTURBED else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 128])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=0.05, help="length of one timed round")
    parser.add_argument("--cache-mb", type=int, default=128, help="weight copies cycled through per variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(cpu_description())
    variants = [
        (f"{name} {layout}", dtype, layout == "packed")
        for name, dtype in ((name, DTYPES[name]) for name in args.dtypes)
        for layout in ("F.linear", "packed")
    ]
    big = max(args.batch)
    header = f"{'shape':>8} {'in x out':>12} {'rows':>4} " + " ".join(f"{v[0]:>15}" for v in variants)
    print(f"\nmicroseconds per call; [GB/s of weight read] at batch 1, [GFLOP/s] at batch {big}; ! disturbed")
    print(header)
    results: list[Result] = []
    for shape in args.shapes:
        in_features, out_features = SHAPES[shape]
        for batch in args.batch:
            cells = []
            for variant, dtype, packed in variants:
                result = Result(shape, in_features, out_features, batch, variant, float("nan"))
                try:
                    call = make_call(packed, dtype, in_features, out_features, batch, args.cache_mb << 20)
                    result.seconds, result.others = time_call(call, args.round_seconds, args.repeats)
                    del call
                except RuntimeError as exc:  # e.g. oneDNN fp16 needs avx512_fp16 or avx_ne_convert
                    result.error = str(exc).splitlines()[0]
                results.append(result)
                cells.append(cell(result, big))
            print(f"{shape:>8} {f'{in_features}x{out_features}':>12} {batch:>4} " + " ".join(f"{c:>15}" for c in cells))
    disturbed = sum(r.others > DISTURBED for r in results)
    if disturbed:
        print(f"! {disturbed} timings ran while other processes used over {DISTURBED} of a core: rerun")
    for error in sorted({f"{r.variant}: {r.error}" for r in results if r.error}):
        print(f"n/a  {error}")
    if args.json:
        rows = [asdict(r) | {"weight_gbs": r.weight_gbs, "gflops": r.gflops} for r in results]
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
