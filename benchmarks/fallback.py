"""Decode throughput of the transformers fallback vs the native plugin vs transformers ``generate``.

The Qwen2-0.5B-shaped random checkpoint of ``benchmarks/decode.py`` (fp32, greedy), served three
ways: vlm with vlm-plugin-llama's native Qwen2 (``--plugin llama``), vlm with the transformers
fallback (``--plugin transformers``: transformers' own Qwen2 modules, attention paged by vlm), and
transformers ``generate``. One run at each batch size; tokens/s of decode (TTFT subtracted).
The issue's target: the fallback at batch 16 at least 2x ``generate``.

    python benchmarks/fallback.py                          # batch 1 and 16, 128 + 128 tokens
    python benchmarks/fallback.py --prompt-len 32 --new-tokens 16     # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# decode.py's checkpoint and timing helpers, loaded by path (benchmarks/ is not a package)
_spec = importlib.util.spec_from_file_location("vlm_bench_decode", HERE / "decode.py")
assert _spec is not None and _spec.loader is not None
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)
CACHE, bench_transformers, bench_vlm, checkpoint, prompts = (
    decode.CACHE,
    decode.bench_transformers,
    decode.bench_vlm,
    decode.checkpoint,
    decode.prompts,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=CACHE / "qwen2-0.5b-random")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from vlm import LLM

    device = torch.device(args.device)
    path = checkpoint(args.model)
    settings = dict(
        device=args.device,
        dtype="float32",
        max_num_seqs=max(args.batch),
        max_model_len=args.prompt_len + args.new_tokens + 16,
        enable_prefix_caching=False,  # the TTFT run would leave the prompts cached for the timed run
    )
    engines = {
        "native": LLM(str(path), plugin="llama", **settings),
        "fallback": LLM(str(path), plugin="transformers", **settings),
    }
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    print(
        f"device {device} (threads {torch.get_num_threads()}); {args.prompt_len} prompt + {args.new_tokens} new tokens"
    )
    print(f"{'batch':>5} {'native tok/s':>12} {'fallback tok/s':>14} {'generate tok/s':>14} {'fallback/generate':>17}")
    for batch in args.batch:
        ids = prompts(batch, args.prompt_len, 256)
        rates = {name: bench_vlm(llm, ids, args.new_tokens, device)[1] for name, llm in engines.items()}
        rates["generate"] = bench_transformers(hf, ids, args.new_tokens)[1]
        print(
            f"{batch:>5} {rates['native']:>12.1f} {rates['fallback']:>14.1f} {rates['generate']:>14.1f} "
            f"{rates['fallback'] / rates['generate']:>16.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
