"""Serving throughput of vlm's engine vs transformers, in one run, on the same checkpoints (fp32).

1. text: Qwen2-0.5B shape, 16 requests of 128 prompt tokens and 128 new tokens. vlm gets all 16
   at once (continuous batching); transformers runs them as one batched ``generate``.
2. images: InternVL2-1B shape (InternViT-300M + Qwen2-0.5B), 16 requests with one 448-px image
   each and 64 new tokens; transformers runs one batch. Also the median time to first token.

    python benchmarks/serving.py [--skip-images] [--requests 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402
import internvl  # noqa: E402


def engine_run(llm, requests, params) -> tuple[float, list[float]]:
    """Wall time for all requests submitted together, and each request's time to first token."""
    engine = llm.engine
    start = time.perf_counter()
    ids = [engine.add_request(r, params) for r in requests]
    first: dict[str, float] = {}
    done = 0
    while done < len(ids):
        for output in engine.step():
            first.setdefault(output.request_id, time.perf_counter() - start)
            done += output.finished
    return time.perf_counter() - start, [first[i] for i in ids]


def hf_run(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, float]:
    """Wall time of one batched generate, and its time to first token (a 1-token generate)."""
    common = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(input_ids), **kwargs)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **common)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)
        return time.perf_counter() - start, ttft


def text_benchmark(requests: int) -> None:
    from transformers import AutoModelForCausalLM

    from vlm import LLM, SamplingParams

    path = decode.checkpoint(decode.CACHE / "qwen2-0.5b-random")
    prompts = decode.prompts(requests, 128, 0)
    llm = LLM(str(path), max_num_seqs=requests, max_model_len=512, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    engine_run(llm, [p[:8] for p in prompts[:2]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    vlm_wall, vlm_ttfts = engine_run(llm, prompts, params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_run(hf, torch.tensor([p[:8] for p in prompts[:2]]), 2)  # warm-up
    hf_wall, hf_ttft = hf_run(hf, torch.tensor(prompts), 128)
    tokens = requests * 128
    print(f"text, {requests} x (128 prompt + 128 new), Qwen2-0.5B shape:")
    print(f"  vlm          {tokens / vlm_wall:7.1f} tok/s  median TTFT {statistics.median(vlm_ttfts):6.2f} s")
    print(f"  transformers {tokens / hf_wall:7.1f} tok/s  TTFT        {hf_ttft:6.2f} s")
    print(f"  ratio        {hf_wall / vlm_wall:7.2f}x")


def image_benchmark(requests: int) -> None:
    from transformers import InternVLForConditionalGeneration

    from vlm import LLM, SamplingParams
    from vlm.inputs import ImageInput, ModelInputs

    path = internvl.checkpoint(internvl.CACHE / "internvl2-1b-random")
    raw = [internvl.request(i) for i in range(requests)]
    llm = LLM(str(path), max_num_seqs=requests, max_model_len=1024, enable_prefix_caching=False)

    def inputs(salt: str):
        return [
            ModelInputs(
                token_ids=ids, images=[ImageInput(pixels, 256, f"{salt}-{i}")], image_token_id=internvl.IMAGE_TOKEN
            )
            for i, (ids, pixels) in enumerate(raw)
        ]

    engine_run(llm, inputs("warm")[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    vlm_wall, vlm_ttfts = engine_run(llm, inputs("run"), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([r[0] for r in raw])
    pixels = torch.cat([r[1] for r in raw])
    hf_run(hf, ids[:1], 2, pixel_values=pixels[:1])  # warm-up
    hf_wall, hf_ttft = hf_run(hf, ids, 64, pixel_values=pixels)
    tokens = requests * 64
    print(f"images, {requests} x (one 448-px image + 27 text tokens, 64 new), InternVL2-1B shape:")
    print(f"  vlm          {tokens / vlm_wall:7.1f} tok/s  median TTFT {statistics.median(vlm_ttfts):6.2f} s")
    print(f"  transformers {tokens / hf_wall:7.1f} tok/s  TTFT        {hf_ttft:6.2f} s")
    print(f"  ratio        {hf_wall / vlm_wall:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    if not args.skip_text:
        text_benchmark(args.requests)
    if not args.skip_images:
        image_benchmark(args.requests)


if __name__ == "__main__":
    main()
