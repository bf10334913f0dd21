"""CogVLM2 in vlm vs the plugin's plain-torch reference: time to first token and decode tokens/s.

One run, one request (a picture and a question), greedy, fp32, on a random checkpoint with
CogVLM2's shape (grouped-query attention, visual experts in every layer, 2x2 conv down-sampling)
but fewer layers. The reference (``vlm_plugin_cogvlm.reference``) is the oracle of the parity
tests: one forward over the whole sequence per token, no KV cache, so its decode slows with length.

    python benchmarks/cogvlm.py                     # preset "small": CI-sized widths
    python benchmarks/cogvlm.py --preset depth2     # CogVLM2's widths (4096 / 1792), 2 + 2 layers, 448 px

TTFT includes the vision tower. The checkpoint is cached under benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CACHE = Path(__file__).resolve().parent / ".cache"

PRESETS = {
    # CogVLM2's proportions at a quarter of its widths and a small vocabulary
    "small": dict(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=2, num_attention_heads=8, num_multi_query_heads=2,
        vocab_size=32000,
        vision_config=dict(hidden_size=448, intermediate_size=3840, num_heads=4, num_hidden_layers=2, image_size=224),
    ),
    # CogVLM2-Llama3-19B's widths and vocabulary, 2 decoder and 2 tower layers, 448 px pictures (16 GB fp32)
    "depth2": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32, num_multi_query_heads=8,
        vocab_size=128256,
        vision_config=dict(hidden_size=1792, intermediate_size=15360, num_heads=16, num_hidden_layers=2, image_size=448),
    ),
}  # fmt: skip


def checkpoint(preset: str) -> Path:
    from vlm_plugin_cogvlm.testing import write_tiny_cogvlm

    path = CACHE / f"cogvlm2-{preset}"
    if not (path / "config.json").is_file():
        write_tiny_cogvlm(path, "cogvlm2", seed=0, **json.loads(json.dumps(PRESETS[preset])))
    return path


def prompt(seed: int) -> list[dict]:
    """A question about a 640x480 picture (another seed: another picture, so no cached features)."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]


def run_vlm(path: Path, new_tokens: int) -> tuple[float, float, list[int]]:
    from vlm import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    llm.generate([prompt(0)], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    start = time.perf_counter()
    llm.generate([prompt(1)], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.generate([prompt(2)], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    total = time.perf_counter() - start
    return ttft, (new_tokens - 1) / (total - ttft), out[0].outputs[0].token_ids


def run_reference(path: Path, new_tokens: int) -> tuple[float, float, list[int]]:
    from vlm.config import load_model_config
    from vlm.loader import load_tokenizer
    from vlm_plugin_cogvlm.preprocess import CogVLMPreprocessor
    from vlm_plugin_cogvlm.reference import CogVLMReference, reference_inputs

    config = load_model_config(path)
    preprocessor = CogVLMPreprocessor(load_tokenizer(path), config.hf_config, path)
    inputs = preprocessor(prompt(2))
    model = CogVLMReference.from_pretrained(path)
    extra = reference_inputs(inputs)
    ids = list(inputs.token_ids)
    start = time.perf_counter()
    ids.append(int(model(torch.tensor([ids]), **extra).logits[0, -1].argmax()))
    ttft = time.perf_counter() - start
    for _ in range(new_tokens - 1):
        ids.append(int(model(torch.tensor([ids]), **extra).logits[0, -1].argmax()))
    total = time.perf_counter() - start
    return ttft, (new_tokens - 1) / (total - ttft), ids[len(inputs.token_ids) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    path = checkpoint(args.preset)
    vlm_ttft, vlm_rate, vlm_tokens = run_vlm(path, args.new_tokens)
    ref_ttft, ref_rate, ref_tokens = run_reference(path, args.new_tokens)
    print(
        f"CogVLM2-shaped ({args.preset}), 1 picture, {args.new_tokens} new tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(f"{'':12}{'TTFT s':>10}{'decode tok/s':>15}")
    print(f"{'vlm':12}{vlm_ttft:>10.3f}{vlm_rate:>15.1f}")
    print(f"{'reference':12}{ref_ttft:>10.3f}{ref_rate:>15.1f}")
    print(f"{'ratio':12}{ref_ttft / vlm_ttft:>9.2f}x{vlm_rate / ref_rate:>14.2f}x   (vlm faster when > 1)")
    print(f"same greedy tokens: {vlm_tokens == ref_tokens}")


if __name__ == "__main__":
    main()
