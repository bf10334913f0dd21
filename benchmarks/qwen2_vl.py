"""Image chat latency of vlm vs transformers on a Qwen2-VL-2B-shaped random checkpoint.

Vision tower 32 x 1280 (16 heads) + Qwen2-1.5B-shaped language model (28 layers, width 1536),
fp32, greedy. Both engines get identical inputs, made once by vlm's preprocessor (which equals
transformers' processor token for token and pixel for pixel): one 448x448 picture (1024 patches,
256 image tokens) plus a short question, so the comparison is of the engines. Reported: time to
first token (vision tower + prefill) and decode tokens/s, and their ratios.

    python benchmarks/qwen2_vl.py [--new-tokens 64] [--batch 1 4] [--flavor qwen2_5_vl]
    python benchmarks/qwen2_vl.py --tiny      # the test suite's tiny checkpoint: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from internvl import hf_generate_timings  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def checkpoint(path: Path, flavor: str) -> Path:
    """A random checkpoint of the real models' shapes (once), with the tiny tokenizer's vision token
    ids (the preprocessor checks that config and tokenizer agree) and the real pixel budget."""
    if (path / "config.json").is_file():
        return path
    print(f"writing a random {flavor} 2B-shaped checkpoint to {path} (once)")
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    text = dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    )
    if flavor == "qwen2_vl":
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, initializer_range=0.02)
    else:  # Qwen2.5-VL-3B's tower on the same language model
        vision = dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=1536,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            initializer_range=0.02,
        )
    return write_tiny_qwen2_vl(
        path,
        flavor,
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
    )


def request(llm, index: int, size: int, question_tokens: int = 24):
    """ModelInputs for one picture and a random question, from vlm's preprocessor."""
    rng = np.random.default_rng(index)
    picture = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    question = bytes(rng.integers(97, 123, question_tokens, dtype=np.uint8)).decode()
    return llm.engine.preprocess(
        [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": question}]}]
    )


def bench_vlm(llm, requests, new_tokens: int) -> tuple[float, float]:
    from vlm import SamplingParams

    def fresh(inputs, salt):
        # a new image key per run: the engine must run the vision tower, not its embedding cache
        images = [
            dataclasses.replace(image, key=f"{image.key}-{salt}-{time.perf_counter()}") for image in inputs.images
        ]
        return dataclasses.replace(inputs, images=images)

    llm.generate([fresh(requests[0], "warm")], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    llm.generate([fresh(r, "ttft") for r in requests], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(
        [fresh(r, "run") for r in requests], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    )
    total = time.perf_counter() - start
    return ttft, len(requests) * (new_tokens - 1) / max(total - ttft, 1e-9)


def bench_transformers(model, requests, new_tokens: int) -> tuple[float, float]:
    from vlm_plugin_qwen2vl.testing import reference_inputs

    input_ids = torch.tensor([r.token_ids for r in requests])
    extra = [reference_inputs(r) for r in requests]
    return hf_generate_timings(
        model,
        input_ids,
        new_tokens,
        pixel_values=torch.cat([e["pixel_values"] for e in extra]),
        image_grid_thw=torch.cat([e["image_grid_thw"] for e in extra]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--flavor", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_vl")
    parser.add_argument("--size", type=int, default=448, help="picture side in pixels (448: 256 image tokens)")
    parser.add_argument(
        "--model", type=Path, help="checkpoint directory (default: written once under benchmarks/.cache)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoint, to check the script runs")
    args = parser.parse_args()

    from vlm import LLM
    from vlm_plugin_qwen2vl.testing import ReferenceModel, write_tiny_qwen2_vl

    if args.tiny:
        path = args.model or CACHE / f"{args.flavor}-tiny"
        if not (path / "config.json").is_file():
            write_tiny_qwen2_vl(path, args.flavor)
    else:
        path = checkpoint(args.model or CACHE / f"{args.flavor}-2b-random", args.flavor)
    # one engine in memory at a time: two fp32 copies of a 2B model and a KV cache crowd 24 GiB
    llm = LLM(
        str(path), max_num_seqs=max(args.batch), max_model_len=2048, enable_prefix_caching=False, kv_cache_gib=0.5
    )
    print(
        f"threads {torch.get_num_threads()}; {args.flavor}; one {args.size}x{args.size} picture + a 24-letter question per request"
    )
    batches = {batch: [request(llm, i, args.size) for i in range(batch)] for batch in args.batch}
    for requests in batches.values():
        assert len({len(r.token_ids) for r in requests}) == 1, (
            "transformers gets one unpadded batch: prompts must be equally long"
        )
    ours = {batch: bench_vlm(llm, requests, args.new_tokens) for batch, requests in batches.items()}
    del llm
    gc.collect()
    hf = ReferenceModel.from_pretrained(path)
    with torch.inference_mode():
        theirs = {batch: bench_transformers(hf, requests, args.new_tokens) for batch, requests in batches.items()}
    print(
        f"{'batch':>5} {'tokens':>6} {'vlm TTFT':>9} {'hf TTFT':>8} {'ratio':>6} {'vlm tok/s':>10} {'hf tok/s':>9} {'ratio':>6}"
    )
    for batch, requests in batches.items():
        (vlm_ttft, vlm_tps), (hf_ttft, hf_tps) = ours[batch], theirs[batch]
        print(
            f"{batch:>5} {len(requests[0].token_ids):>6} {vlm_ttft:>8.2f}s {hf_ttft:>7.2f}s {hf_ttft / vlm_ttft:>5.2f}x "
            f"{vlm_tps:>10.2f} {hf_tps:>9.2f} {vlm_tps / hf_tps:>5.2f}x"
        )


if __name__ == "__main__":
    main()
