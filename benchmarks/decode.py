"""Decode throughput of vlm vs transformers ``generate`` on a Qwen2-0.5B-shaped random checkpoint.

One run measures both engines on the same checkpoint (fp32, greedy, 128 prompt tokens, 128 new
tokens) at each batch size, and prints tokens/s and the ratio. The memory-bandwidth ceiling at
batch 1 is ``bandwidth / weight bytes`` (every decode step reads every weight once).

    python benchmarks/decode.py                      # batch 1 and 8
    python benchmarks/decode.py --batch 1 8 16 --bandwidth-gbs 21
    python benchmarks/decode.py --device cuda --batch 1 8 16 --bandwidth-gbs 4800   # both engines on the GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"

QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from transformers import AutoModelForCausalLM, Qwen2Config

    from vlm.testing import build_byte_tokenizer

    print(f"writing a random Qwen2-0.5B-shaped checkpoint to {path} (once)")
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_0_5B, initializer_range=0.02, architectures=["Qwen2ForCausalLM"])
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 151645, 151643, None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, length), generator=generator).tolist()


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_transformers(model, ids: list[list[int]], new_tokens: int) -> tuple[float, float]:
    device = model.device
    input_ids = torch.tensor(ids, device=device)
    mask = torch.ones_like(input_ids)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    model.generate(input_ids[:, :8], max_new_tokens=2, **kwargs)  # warm-up
    start = clock(device)
    model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = clock(device) - start
    start = clock(device)
    model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = clock(device) - start
    return ttft, len(ids) * (new_tokens - 1) / max(total - ttft, 1e-9)


def bench_vlm(llm, ids: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, float]:
    from vlm import SamplingParams

    llm.generate([ids[0][:8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    start = clock(device)
    llm.generate(ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    ttft = clock(device) - start
    start = clock(device)
    llm.generate(ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    total = clock(device) - start
    return ttft, len(ids) * (new_tokens - 1) / max(total - ttft, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=21.0,
        help="measured memory bandwidth (GB/s) of the device (default: the CPU's)",
    )
    parser.add_argument("--device", default="cpu", help="where both engines run: cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--model", type=Path, default=CACHE / "qwen2-0.5b-random")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from vlm import LLM

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    path = checkpoint(args.model)
    # no prefix caching: the TTFT run would otherwise leave the prompts cached for the timed run
    llm = LLM(
        str(path),
        device=args.device,
        dtype="float32",
        max_num_seqs=max(args.batch),
        max_model_len=args.prompt_len + args.new_tokens + 16,
        enable_prefix_caching=False,
    )
    # every decode step reads every weight once (the tied LM head reads the embedding's size)
    weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ceiling = args.bandwidth_gbs * 1e9 / weight_bytes
    hf = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(
        f"device {device} ({where}); weights {weight_bytes / 1e9:.2f} GB fp32; batch-1 bandwidth ceiling "
        f"{ceiling:.1f} tok/s at {args.bandwidth_gbs} GB/s"
    )
    print(
        f"{'batch':>5} {'vlm tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'vlm TTFT':>9} {'hf TTFT':>8} {'% ceiling':>9}"
    )
    results = []
    for batch in args.batch:
        ids = prompts(batch, args.prompt_len, QWEN2_0_5B["vocab_size"])
        vlm_ttft, vlm_tps = bench_vlm(llm, ids, args.new_tokens, device)
        hf_ttft, hf_tps = bench_transformers(hf, ids, args.new_tokens) if hf is not None else (float("nan"),) * 2
        row = dict(
            batch=batch,
            vlm_tok_s=vlm_tps,
            hf_tok_s=hf_tps,
            ratio=vlm_tps / hf_tps,
            vlm_ttft_s=vlm_ttft,
            hf_ttft_s=hf_ttft,
            pct_of_ceiling=100 * vlm_tps / batch / ceiling if batch == 1 else None,
        )
        results.append(row)
        pct = f"{row['pct_of_ceiling']:.0f}%" if row["pct_of_ceiling"] is not None else "-"
        print(
            f"{batch:>5} {vlm_tps:>10.2f} {hf_tps:>9.2f} {row['ratio']:>5.2f}x {vlm_ttft:>8.2f}s {hf_ttft:>7.2f}s {pct:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
