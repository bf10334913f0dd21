"""Where a decode step's time goes, per op, at each precision: what bound stops each one.

On the Qwen2-0.5B-shaped random checkpoint of ``benchmarks/decode.py`` (fp32 weights; vlm's
``dtype=bfloat16`` for bf16 and ``--quantize int8|int4`` for the quantized rows), each precision
decodes ``--steps`` steps at each batch size (after the prompts' prefill and a few warm-up steps)
under ``torch.profiler``. Every module of interest is wrapped in a ``vlm::KIND`` range (the four
linear kinds of a decoder layer, the LM head, attention, norms, rotary, the activation, the
embedding, sampling), and the table gives per step:

- each kind's share of the wall time: the time of the aten ops inside its ranges (``ops``), and
  the Python of the module around them (``py``: the range's time minus its ops');
- ``other ops``: aten ops outside those ranges (residual adds, slicing, the step's metadata);
- ``python``: the rest of the wall time (the engine's scheduling, bookkeeping, the interpreter);
- for the GEMMs, the weight bytes each step reads, as GB/s over the kind's op time, next to the
  read bandwidth this machine measures (``sum()`` over a tensor far larger than the caches), and
  GFLOP/s. A GEMM near the bandwidth is memory-bound; far below it at batch 1 it is bound by
  the kernel's arithmetic (dequantizing, converting) rather than by the bytes.

The profiler adds overhead to each op (the untraced wall time is printed too, as tok/s): shares
are indicative, the more so on a busy machine (the load average is printed). Run it on a quiet one.

    python benchmarks/op_profile.py                               # fp32 bf16 int8 int4, batch 1 and 16
    python benchmarks/op_profile.py --precisions int8 --batch 1 --steps 8
    python benchmarks/op_profile.py --json profile.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent

HERE = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "bf16", "int8", "int4", "w8a8")
GEMM_KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
RANGE = "vlm::"


def load_sibling(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 9) -> float:
    """GB/s that ``sum()`` reads over a tensor far larger than the caches: the best of ``repeats``
    (on a shared machine the others are other people's load, not the memory's speed)."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / min(times) / 1e9


# -- which modules are which kind -------------------------------------------------------------


def kind_of(name: str, module: nn.Module) -> str | None:
    from vlm.nn.activation import SiluAndMul
    from vlm.nn.attention import Attention
    from vlm.nn.embedding import ParallelLMHead, VocabParallelEmbedding
    from vlm.nn.linear import PackableLinear
    from vlm.nn.norm import RMSNorm
    from vlm.nn.rotary import RotaryEmbedding

    if isinstance(module, ParallelLMHead):
        return "lm_head"
    if isinstance(module, VocabParallelEmbedding):
        return "embedding"
    if isinstance(module, PackableLinear):
        leaf = name.rpartition(".")[2]
        return leaf if leaf in GEMM_KINDS else "linear (other)"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, RotaryEmbedding):
        return "rotary"
    if isinstance(module, SiluAndMul):
        return "activation"
    return None


def weight_bytes(module: nn.Module) -> int:
    """The bytes of weights one call of ``module`` reads: quantized codes and scales, the packed
    copy, or the dense weight."""
    quantized = getattr(module, "quantized", None)
    if quantized is not None:
        return int(quantized.nbytes())
    packed = getattr(module, "packed_weight", None)
    tensor: torch.Tensor = packed if packed is not None else module.get_parameter("weight")
    return tensor.numel() * tensor.element_size()


def gemm_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear or LM head on this rank."""
    quantized = getattr(module, "quantized", None)
    if quantized is not None:
        return quantized.out_features, quantized.in_features
    weight = module.get_parameter("weight")
    out_features, in_features = weight.shape
    if weight.numel():
        return out_features, in_features
    packed = getattr(module, "packed_weight", None)  # the dense weight was freed once packed
    assert packed is not None
    return packed.numel() // in_features, in_features


def annotate(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Wrap each module of a known kind in a ``vlm::KIND`` profiler range; {kind: modules}."""
    kinds: dict[str, list[nn.Module]] = defaultdict(list)
    for name, module in model.named_modules():
        kind = kind_of(name, module)
        if kind is None:
            continue
        kinds[kind].append(module)
        forward = module.forward

        @functools.wraps(forward)
        def ranged(*args: Any, _forward=forward, _label=RANGE + kind, **kwargs: Any) -> Any:
            with torch.profiler.record_function(_label):
                return _forward(*args, **kwargs)

        module.forward = ranged
    return kinds


def annotate_sampling() -> None:
    import vlm.engine.llm_engine as llm_engine

    sample = llm_engine.sample

    def ranged(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(RANGE + "sampling"):
            return sample(*args, **kwargs)

    llm_engine.sample = ranged


# -- attributing the profile ------------------------------------------------------------------


def _range_of(event: FunctionEvent) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(RANGE):
            return parent.name.removeprefix(RANGE)
        parent = parent.cpu_parent
    return None


def _has_op_ancestor(event: FunctionEvent) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if not parent.name.startswith(RANGE):
            return True
        parent = parent.cpu_parent
    return False


def attribute(events: list[FunctionEvent]) -> tuple[dict[str, float], dict[str, float]]:
    """({kind: op µs}, {kind: range µs}): op time is the outermost aten ops' time (their children
    are inside it), attributed to the innermost ``vlm::`` range around them ("other ops": none)."""
    ops: dict[str, float] = defaultdict(float)
    ranges: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith(RANGE):
            # a kind nested in another of the same kind (none here) would count twice
            ranges[event.name.removeprefix(RANGE)] += event.cpu_time_total
        elif not _has_op_ancestor(event):
            ops[_range_of(event) or "other ops"] += event.cpu_time_total
    return ops, ranges


# -- one precision ----------------------------------------------------------------------------


def engine_settings(precision: str, group_size: int) -> dict[str, Any]:
    if precision in ("fp32", "bf16"):
        return {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[precision]}
    return {"dtype": "float32", "quantization": precision, "quantization_group_size": group_size}


def profile_precision(precision: str, args: argparse.Namespace, path: Path, decode: ModuleType) -> list[dict]:
    from vlm import LLM, SamplingParams

    llm = LLM(
        str(path),
        device="cpu",
        max_num_seqs=max(args.batch),
        max_model_len=args.prompt_len + args.warmup + 2 * args.steps + 16,
        enable_prefix_caching=False,
        num_threads=args.threads,
        **engine_settings(precision, args.group_size),
    )
    engine = llm.engine
    kinds = annotate(engine.model)
    rows = []
    for batch in args.batch:
        params = SamplingParams(temperature=0, max_tokens=args.warmup + 2 * args.steps + 2, ignore_eos=True)
        for ids in decode.prompts(batch, args.prompt_len, decode.QWEN2_0_5B["vocab_size"]):
            engine.add_request(ids, params)
        while len(engine.step()) < batch:
            pass  # prefill (in chunks, if the scheduler splits it) until every sequence samples
        for _ in range(args.warmup):
            engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        untraced = (time.perf_counter() - start) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            traced = (time.perf_counter() - start) / args.steps
        for request_id in engine.unfinished_request_ids():
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
        ops, ranges = attribute(list(prof.events()))
        rows.append(summarize(precision, batch, args.steps, untraced, traced, ops, ranges, kinds))
        print_row(rows[-1], args.bandwidth)
    del llm
    return rows


def summarize(
    precision: str,
    batch: int,
    steps: int,
    untraced: float,
    traced: float,
    ops: dict[str, float],
    ranges: dict[str, float],
    kinds: dict[str, list[nn.Module]],
) -> dict:
    per_step_ms = {kind: us / steps / 1e3 for kind, us in ops.items()}
    range_ms = {kind: us / steps / 1e3 for kind, us in ranges.items()}
    op_total = sum(per_step_ms.values())
    gemms = {}
    for kind in GEMM_KINDS:
        modules = kinds.get(kind, [])
        if not modules or per_step_ms.get(kind, 0) <= 0:
            continue
        read = sum(weight_bytes(m) for m in modules)
        flops = sum(2 * batch * out * inp for out, inp in map(gemm_shape, modules))
        seconds = per_step_ms[kind] / 1e3
        gemms[kind] = {"weight_mb": read / 1e6, "gbs": read / seconds / 1e9, "gflops": flops / seconds / 1e9}
    return {
        "precision": precision,
        "batch": batch,
        "untraced_ms": untraced * 1e3,
        "tok_s": batch / untraced,
        "traced_ms": traced * 1e3,
        "op_ms": per_step_ms,
        "range_ms": range_ms,
        "python_ms": traced * 1e3 - op_total - sum(range_ms[k] - per_step_ms.get(k, 0) for k in range_ms),
        "gemm": gemms,
    }


ORDER = (*GEMM_KINDS, "linear (other)", "attention", "norm", "rotary", "activation", "embedding", "sampling")


def print_row(row: dict, bandwidth: float) -> None:
    traced = row["traced_ms"]
    print(
        f"\n{row['precision']} batch {row['batch']}: {row['tok_s']:.1f} tok/s untraced "
        f"({row['untraced_ms']:.1f} ms/step), traced {traced:.1f} ms/step; machine reads {bandwidth:.1f} GB/s"
    )
    print(f"  {'kind':<15} {'ops ms':>7} {'py ms':>6} {'share':>6}   {'weights MB':>10} {'GB/s':>6} {'GFLOP/s':>8}")
    for kind in (*ORDER, "other ops"):
        op = row["op_ms"].get(kind, 0.0)
        py = row["range_ms"].get(kind, op) - op if kind in row["range_ms"] else 0.0
        if op == 0 and py == 0:
            continue
        gemm = row["gemm"].get(kind)
        extra = f"   {gemm['weight_mb']:10.1f} {gemm['gbs']:6.1f} {gemm['gflops']:8.1f}" if gemm else ""
        print(f"  {kind:<15} {op:7.2f} {py:6.2f} {100 * (op + py) / traced:5.1f}%{extra}")
    print(f"  {'python':<15} {'':>7} {row['python_ms']:6.2f} {100 * row['python_ms'] / traced:5.1f}%")
    print("  bound: " + verdict(row, bandwidth))


def verdict(row: dict, bandwidth: float) -> str:
    """One line: what takes the time, and for the GEMMs whether the bytes or the arithmetic."""
    traced = row["traced_ms"]
    gemm_ms = sum(row["op_ms"].get(kind, 0.0) for kind in row["gemm"])
    read_mb = sum(g["weight_mb"] for g in row["gemm"].values())
    gflop = sum(g["gflops"] * row["op_ms"][kind] / 1e3 for kind, g in row["gemm"].items())
    gbs = read_mb / gemm_ms if gemm_ms else 0.0  # MB per ms = GB/s
    share = 100 * gemm_ms / traced
    if gbs >= 0.7 * bandwidth:
        what = f"memory bandwidth ({gbs:.1f} of {bandwidth:.1f} GB/s)"
    else:
        what = (
            f"the kernels' arithmetic, not the bytes ({gbs:.1f} GB/s of {bandwidth:.1f}, "
            f"{gflop / gemm_ms * 1e3:.0f} GFLOP/s; at the bandwidth they would take "
            f"{read_mb / bandwidth:.1f} ms, not {gemm_ms:.1f})"
        )
    biggest = max((k for k in row["op_ms"] if k not in row["gemm"]), key=lambda k: row["op_ms"][k], default=None)
    rest = f"everything else {100 - share:.0f}%"
    if biggest is not None:
        rest += f", most of it {biggest} ({100 * row['op_ms'][biggest] / traced:.0f}%)"
    python = 100 * row["python_ms"] / traced
    return f"GEMMs {share:.0f}% of the step, bound by {what}; {rest}; python {python:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (and as many timed untraced)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--model", type=Path, default=HERE / ".cache" / "qwen2-0.5b-random")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    decode = load_sibling("decode")
    peers = load_sibling("peers")
    path = decode.checkpoint(args.model)
    print(peers.cpu_description())
    print(f"threads {torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    args.bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth (sum over 1 GiB): {args.bandwidth:.1f} GB/s")
    annotate_sampling()
    rows = []
    for precision in args.precisions:
        rows += profile_precision(precision, args, path, decode)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": args.bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
