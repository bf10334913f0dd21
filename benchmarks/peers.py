"""Decode throughput of vlm at each precision next to llama.cpp and transformers, one run, one checkpoint.

On the Qwen2-0.5B-shaped random checkpoint of ``benchmarks/decode.py`` (its ``checkpoint()``,
``prompts()`` and timing helpers are reused), greedy, ``--prompt-len`` prompt tokens and
``--new-tokens`` new tokens (128 + 128 by default) at each ``--batch`` (1, 8, 16), it times:

- vlm ``fp32``, ``bf16`` (``LLM(dtype="bfloat16")``), ``int8``, ``int4`` and ``w8a8``
  (``LLM(quantization=...)``, int4 in groups of ``--group-size``; activations in the default
  dtype, fp32 for this checkpoint; w8a8 quantizes them to int8 per token inside each linear);
- transformers ``generate`` in fp32;
- llama.cpp through llama-cpp-python's low-level API (``llama_decode``, one sequence id per
  request, greedy argmax over the logits here) on GGUF files of the same checkpoint: ``F32``,
  ``F16``, ``Q8_0``, ``Q4_0`` (cached next to the checkpoint).

Every engine gets the same prompt token ids and ignores EOS (vlm ``ignore_eos``, transformers
``min_new_tokens``, llama.cpp never looks) and runs alone, each row in a process of its own (so
the previous engine is gone, and a crash costs one row). Decode tok/s is summed over the batch:
``batch * (new_tokens - 1) / (total time - TTFT)``, TTFT timed by a separate one-token run, as in
decode.py. The table ends with vlm / llama.cpp ratios at the same precision (fp32 / F32,
bf16 / F16, int8 / Q8_0, w8a8 / Q8_0, int4 / Q4_0; Q8_0 also quantizes activations to 8 bits).
The full default run takes about 20 minutes on 2 cores (2026-12-01); ``--only`` and ``--batch``
shorten it. Run it on an idle machine: with another process on one of the 2 cores, vlm bf16 fell
from 7.9 to 1.7 tok/s at batch 1 and llama.cpp (a barrier per op) to a fraction of a token per
second.

Benchmark-only dependencies (never the product's): a natively built llama-cpp-python and
llama.cpp's converter. The recipe that worked here (the build: about 15 minutes on 2 idle
cores, 40 on a busy machine)::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /work/peers-build
    cd /work/peers-build && tar xzf llama_cpp_python-*.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip wheel --no-deps ./llama_cpp_python-*/ -w /work/peers-build
    pip install /work/peers-build/llama_cpp_python-*.whl gguf sentencepiece

On a CPU with AMX (Sapphire Rapids and later) a ``-march=native`` build of 0.3.36 with gcc 12
dies with SIGILL in ``ggml_backend_amx_mul_mat`` on the first Q8_0 / Q4_0 matmul: gcc drops the
stores that fill the on-stack tile config, so ``ldtilecfg`` loads an empty one and the next tile
instruction is illegal (llama.cpp PR 26954, open as of 2026-12). The fix is that PR's: make the
config in ``ggml_tile_config_init`` (ggml/src/ggml-cpu/amx/mmq.cpp) ``static const``, then
rebuild (only libggml-cpu changes: build the ``ggml-cpu`` target of the vendored llama.cpp with
cmake, same flags, and copy ``libggml-cpu.so*`` over the installed ``llama_cpp/lib`` ones). Or
add ``-mno-amx-int8`` to ``CMAKE_C_FLAGS`` / ``CMAKE_CXX_FLAGS`` for a build without AMX.

The GGUF files are written once by the ``convert_hf_to_gguf.py`` vendored in that sdist
(``<sdist>/vendor/llama.cpp``: ``--llama-cpp-dir``, or ``$LLAMA_CPP_DIR``, or found under
/work/peers-build), with ``get_vocab_base_pre`` patched here to answer "qwen2" (the toy byte
tokenizer's hash is in no list) and one merge added to the toy tokenizer's none (llama.cpp refuses
a BPE vocabulary without merges), then quantized with ``llama_cpp.llama_model_quantize``.

    python benchmarks/peers.py                                   # everything, batch 1 8 16
    python benchmarks/peers.py --only vlm-int4 llama-Q4_0 --batch 1 --json peers.json
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load_sibling(name: str) -> ModuleType:
    """Another script of benchmarks/ as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode = load_sibling("decode")

#: row name -> (engine, weights as printed)
ROWS: dict[str, tuple[str, str]] = {
    "vlm-fp32": ("vlm", "fp32"),
    "vlm-bf16": ("vlm", "bf16"),
    "vlm-int8": ("vlm", "int8"),
    "vlm-int4": ("vlm", "int4"),
    "vlm-w8a8": ("vlm", "w8a8"),
    "hf-fp32": ("transformers generate", "fp32"),
    "llama-F32": ("llama.cpp", "F32"),
    "llama-F16": ("llama.cpp", "F16"),
    "llama-Q8_0": ("llama.cpp", "Q8_0"),
    "llama-Q4_0": ("llama.cpp", "Q4_0"),
}
#: vlm row -> llama.cpp row at the same precision
PAIRS = [
    ("vlm-fp32", "llama-F32"),
    ("vlm-bf16", "llama-F16"),
    ("vlm-int8", "llama-Q8_0"),
    ("vlm-w8a8", "llama-Q8_0"),  # both multiply int8 weights by int8-quantized activations
    ("vlm-int4", "llama-Q4_0"),
]
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


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
    missing = " ".join(flag for flag in CPU_FLAGS if flag not in flags) or "none"
    return (
        f"CPU {model}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}\n"
        f"cpu flags present: {present}; absent: {missing}"
    )


# -- llama.cpp ---------------------------------------------------------------------------------


def find_llama_cpp_dir(given: Path | None) -> Path:
    """The llama.cpp source tree vendored in the llama-cpp-python sdist (for its converter)."""
    candidates = [given] if given else []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]))
    candidates += sorted(Path("/work/peers-build").glob("llama_cpp_python-*/vendor/llama.cpp"), reverse=True)
    for candidate in candidates:
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    raise SystemExit(
        "llama.cpp's convert_hf_to_gguf.py not found: unpack the llama-cpp-python sdist and pass "
        "--llama-cpp-dir <sdist>/vendor/llama.cpp (or set LLAMA_CPP_DIR); see this script's docstring"
    )


def convert_to_gguf(model_dir: Path, out: Path, llama_cpp_dir: Path) -> None:
    """The checkpoint as an F32 GGUF, by llama.cpp's own converter run in this process."""
    sys.path.insert(0, str(llama_cpp_dir))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", llama_cpp_dir / "convert_hf_to_gguf.py")
    assert spec is not None and spec.loader is not None
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)  # puts its vendored gguf-py first on sys.path
    import conversion.base  # llama.cpp's, from llama_cpp_dir

    # the toy byte tokenizer's pre-tokenizer hash is in no list; it splits like Qwen2's
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    # it has no merges either, and llama.cpp refuses a BPE vocabulary without any: give it one
    # (of two byte symbols; the benchmark feeds token ids, llama.cpp never tokenizes)
    special_vocab = sys.modules["gguf"].SpecialVocab
    add_to_gguf = special_vocab.add_to_gguf

    def add_with_a_merge(self: Any, writer: Any, quiet: bool = False) -> None:
        if self.load_merges and not self.merges:
            self.merges = ["Ġ Ġ"]
        add_to_gguf(self, writer, quiet)

    special_vocab.add_to_gguf = add_with_a_merge
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", "f32"]
    try:
        converter.main()
    finally:
        sys.argv = argv
        logging.getLogger().setLevel(logging.WARNING)


def gguf_files(model_dir: Path, kinds: list[str], llama_cpp_dir: Path | None) -> dict[str, Path]:
    """GGUF files of the checkpoint, written once (F32 by the converter, the rest quantized from it)."""
    import llama_cpp

    ftypes = {
        "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
        "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
        "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    }
    newest_weight = max(f.stat().st_mtime for f in model_dir.glob("*.safetensors"))
    paths = {kind: model_dir.parent / f"{model_dir.name}-{kind}.gguf" for kind in ftypes}

    def fresh(path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime >= newest_weight

    if not all(fresh(paths[kind]) for kind in kinds):
        if not fresh(paths["F32"]):
            print(f"converting {model_dir} to {paths['F32']} (once)")
            convert_to_gguf(model_dir, paths["F32"], find_llama_cpp_dir(llama_cpp_dir))
        for kind in kinds:
            if kind != "F32" and not fresh(paths[kind]):
                print(f"quantizing to {paths[kind]} (once)")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = ftypes[kind]
                params.nthread = torch.get_num_threads()
                rc = llama_cpp.llama_model_quantize(
                    str(paths["F32"]).encode(), str(paths[kind]).encode(), ctypes.byref(params)
                )
                if rc != 0:
                    raise RuntimeError(f"llama_model_quantize to {kind} failed ({rc})")
    return {kind: paths[kind] for kind in kinds}


class LlamaCpp:
    """A GGUF model and one context sized for ``max_batch`` sequences of ``seq_len`` tokens."""

    def __init__(self, path: Path, max_batch: int, seq_len: int, prompt_len: int, threads: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        # one KV stream per sequence (kv_unified off): each gets n_ctx / n_seq_max cells
        per_seq = -(-seq_len // 256) * 256
        params.n_ctx = max_batch * per_seq
        params.n_seq_max = max_batch
        params.n_batch = max(512, max_batch * prompt_len)  # all prompts in one llama_decode call
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(params.n_batch, 0, max_batch)
        self.flash_attn = params.flash_attn_type

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One ``llama_decode`` of (token, position, sequence, wants logits); the argmax of each wanted row."""
        lc, batch = self.lc, self.batch
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants
        batch.n_tokens = len(entries)
        rc = lc.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, entry in enumerate(entries):
            if entry[3]:
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def generate(self, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy: ``new_tokens`` per prompt, every prompt its own sequence, all decoded together."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries = [
            (token, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(ids)
            for pos, token in enumerate(prompt)
        ]
        tokens = self._decode(entries)
        outputs = [[t] for t in tokens]
        for step in range(1, new_tokens):
            tokens = self._decode([(t, len(ids[s]) + step - 1, s, True) for s, t in enumerate(tokens)])
            for out, t in zip(outputs, tokens):
                out.append(t)
        return outputs


def bench_llama(engine: LlamaCpp, ids: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(TTFT s, decode tok/s summed over the batch), timed as decode.py times vlm and transformers."""
    engine.generate([ids[0][:8]], 2)  # warm-up
    start = time.perf_counter()
    engine.generate(ids, 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    outputs = engine.generate(ids, new_tokens)
    total = time.perf_counter() - start
    assert all(len(out) == new_tokens for out in outputs)
    return ttft, len(ids) * (new_tokens - 1) / max(total - ttft, 1e-9)


# -- the run -----------------------------------------------------------------------------------


def run_row(name: str, args: argparse.Namespace, path: Path, ggufs: dict[str, Path]) -> dict[int, tuple[float, float]]:
    """{batch: (TTFT s, decode tok/s)} of one engine, loaded alone and freed after."""
    results: dict[int, tuple[float, float]] = {}
    seq_len = args.prompt_len + args.new_tokens
    max_batch = max(args.batch)
    cpu = torch.device("cpu")
    bench: Callable[[list[list[int]]], tuple[float, float]]
    close: Callable[[], None] = lambda: None  # noqa: E731
    if name.startswith("vlm-"):
        from vlm import LLM

        kind = name.removeprefix("vlm-")
        engine_args: dict[str, Any] = dict(
            device="cpu",
            max_num_seqs=max_batch,
            max_model_len=seq_len + 16,
            enable_prefix_caching=False,  # the TTFT run would leave the prompts cached for the timed run
        )
        if kind in ("fp32", "bf16"):
            engine_args["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[kind]
        else:
            engine_args["quantization"] = kind
            engine_args["quantization_group_size"] = args.group_size
        llm = LLM(str(path), **engine_args)
        bench = lambda ids: decode.bench_vlm(llm, ids, args.new_tokens, cpu)  # noqa: E731
    elif name == "hf-fp32":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        bench = lambda ids: decode.bench_transformers(hf, ids, args.new_tokens)  # noqa: E731
    else:
        kind = name.removeprefix("llama-")
        engine = LlamaCpp(ggufs[kind], max_batch, seq_len, args.prompt_len, torch.get_num_threads())
        bench = lambda ids: bench_llama(engine, ids, args.new_tokens)  # noqa: E731
        close = engine.close
    try:
        for batch in args.batch:
            ids = decode.prompts(batch, args.prompt_len, decode.QWEN2_0_5B["vocab_size"])
            results[batch] = bench(ids)
            print(
                f"  {name:<11} batch {batch:>2}: {results[batch][1]:7.1f} tok/s, TTFT {results[batch][0]:.2f} s",
                flush=True,
            )
    finally:
        close()
    return results


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def run_in_child(name: str, args: argparse.Namespace) -> tuple[dict[int, tuple[float, float]], str | None]:
    """One row in a fresh process (the engine alone, and all its memory and threads gone after);
    its results, or why there are none (a crash, e.g. an illegal instruction, ends only that row)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--row-out", str(out)]
        command += ["--batch", *map(str, args.batch), "--prompt-len", str(args.prompt_len)]
        command += ["--new-tokens", str(args.new_tokens), "--group-size", str(args.group_size)]
        command += ["--model", str(args.model)]
        proc = subprocess.run(command)
        if proc.returncode != 0 or not out.is_file():
            why = f"exit status {proc.returncode}"
            if proc.returncode == -signal.SIGILL:
                why += " (SIGILL; for llama.cpp's AMX path see the docstring)"
            return {}, why
        return {int(b): (r[0], r[1]) for b, r in json.loads(out.read_text()).items()}, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="vlm int4 group size")
    parser.add_argument("--model", type=Path, default=decode.CACHE / "qwen2-0.5b-random")
    parser.add_argument("--llama-cpp-dir", type=Path, help="<llama-cpp-python sdist>/vendor/llama.cpp (converter)")
    parser.add_argument(
        "--warmup-seconds", type=float, default=10, help="busy time before the first row (the first seconds run slow)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # a child's one row
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    path = decode.checkpoint(args.model)
    if args.row:
        if args.row.startswith("llama-"):
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its C log goes through this logger
        kind = args.row.removeprefix("llama-")
        ggufs = gguf_files(path, [kind], None) if args.row.startswith("llama-") else {}
        results = run_row(args.row, args, path, ggufs)
        args.row_out.write_text(json.dumps(results))
        return

    print(cpu_description())
    llama_kinds = [name.removeprefix("llama-") for name in args.only if name.startswith("llama-")]
    ggufs = {}
    if llama_kinds:
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        ggufs = gguf_files(path, llama_kinds, args.llama_cpp_dir)
        info = llama_cpp.llama_print_system_info().decode().strip()
        print(f"llama-cpp-python {llama_cpp.__version__}, {torch.get_num_threads()} threads; {info}")
    print(
        f"{args.prompt_len} prompt + {args.new_tokens} new tokens, greedy, batch {' '.join(map(str, args.batch))}; "
        f"vlm int4 group size {args.group_size}; each row in its own process",
        flush=True,
    )

    x = torch.randn(512, 512)
    start = time.perf_counter()
    while time.perf_counter() - start < args.warmup_seconds:
        x = (x @ x).tanh()
    table: dict[str, dict[int, tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    for name in args.only:
        table[name], why = run_in_child(name, args)
        if why:
            failed[name] = why
            print(f"  {name}: failed, {why}", flush=True)

    def tps(name: str, batch: int) -> float | None:
        got = table.get(name, {}).get(batch)
        return None if got is None else got[1]

    def ttft(name: str) -> float | None:
        got = table.get(name, {}).get(1)
        return None if got is None else got[0]

    print()
    print("decode tok/s summed over the batch; TTFT at batch 1\n")
    print("| engine | weights | " + " | ".join(f"B={b}" for b in args.batch) + " | TTFT | file |")
    print("| --- | --- | " + " | ".join("---" for _ in args.batch) + " | --- | --- |")
    for name in args.only:
        engine, weights = ROWS[name]
        kind = name.removeprefix("llama-")
        size = f"{ggufs[kind].stat().st_size / 1e9:.2f} GB" if kind in ggufs else "-"
        cells = [fmt(tps(name, b)) for b in args.batch]
        if name in failed:
            cells = [f"failed: {failed[name]}"] + ["-"] * (len(args.batch) - 1)
        print(f"| {engine} | {weights} | " + " | ".join(cells) + f" | {fmt(ttft(name), '.2f', ' s')} | {size} |")
    pairs = [(v, ll) for v, ll in PAIRS if table.get(v) and table.get(ll)]
    if pairs:
        print("\nvlm / llama.cpp at the same precision (decode: above 1 is vlm faster; TTFT: below 1 is vlm faster)\n")
        print("| vlm / llama.cpp | " + " | ".join(f"B={b}" for b in args.batch) + " | TTFT |")
        print("| --- | " + " | ".join("---" for _ in args.batch) + " | --- |")
        for v, ll in pairs:
            cells = []
            for b in args.batch:
                a, c = tps(v, b), tps(ll, b)
                cells.append(fmt(None if a is None or c is None else a / c, ".2f", "x"))
            a, c = ttft(v), ttft(ll)
            ratio = None if a is None or c is None else a / c
            print(f"| {ROWS[v][1]} / {ROWS[ll][1]} | " + " | ".join(cells) + f" | {fmt(ratio, '.2f', 'x')} |")
    if args.json:
        rows = [
            dict(row=name, engine=ROWS[name][0], weights=ROWS[name][1], batch=b, decode_tok_s=r[1], ttft_s=r[0])
            for name, by_batch in table.items()
            for b, r in by_batch.items()
        ]
        args.json.write_text(json.dumps(dict(cpu=cpu_description(), rows=rows, failed=failed), indent=2))


if __name__ == "__main__":
    main()
