"""Image chat latency of vlm vs transformers on an InternVL2-1B-shaped random checkpoint.

InternViT-300M (448-px tiles, 24 layers, width 1024) + Qwen2-0.5B, fp32, HF layout, greedy.
Both engines get identical inputs: one 448x448 tile (256 image tokens) plus a short question,
so the comparison is of the engines, not of the preprocessors. Reported: time to first token
(vision tower + prefill) and decode tokens/s, and their ratios.

    python benchmarks/internvl.py [--new-tokens 64] [--batch 1 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"
IMAGE_TOKEN = 260  # <IMG_CONTEXT> of vlm_plugin_internvl.testing's tokenizer (checked by the preprocessor)


def checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    print(f"writing a random InternVL2-1B-shaped checkpoint to {path} (once)")
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=[448, 448],
            patch_size=[14, 14],
            attention_bias=True,
            use_qk_norm=False,
            layer_scale_init_value=0.1,
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config.text_config.eos_token_id = config.eos_token_id = 151645
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(path)
    write_processor_files(path)
    return path


def write_processor_files(path: Path) -> None:
    """Tokenizer and image-processor files: the benchmark feeds token ids and pixels directly, but
    the engine builds the InternVL preprocessor at start-up and that needs them."""
    import json

    from transformers import GotOcr2ImageProcessorPil

    from vlm_plugin_internvl.testing import build_internvl_tokenizer

    build_internvl_tokenizer().save_pretrained(path)
    GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": 256}))


def request(batch_index: int, question_tokens: int = 24) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_index)
    question = torch.randint(0, 256, (question_tokens,), generator=generator).tolist()
    ids = [1, 2] + [IMAGE_TOKEN] * 256 + [3] + question
    pixels = torch.randn(1, 3, 448, 448, generator=generator)
    return ids, pixels


def bench_vlm(llm, requests, new_tokens: int) -> tuple[float, float]:
    from vlm import SamplingParams
    from vlm.inputs import ImageInput, ModelInputs

    def inputs(ids, pixels, salt):
        image = ImageInput(pixel_values=pixels, num_tokens=256, key=f"bench-{salt}-{time.perf_counter()}")
        return ModelInputs(token_ids=ids, images=[image], image_token_id=IMAGE_TOKEN)

    llm.generate([inputs(*requests[0], "warm")], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    llm.generate(
        [inputs(i, p, "ttft") for i, p in requests], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    )
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(
        [inputs(i, p, "run") for i, p in requests],
        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
    )
    total = time.perf_counter() - start
    return ttft, len(requests) * (new_tokens - 1) / max(total - ttft, 1e-9)


def bench_transformers(model, requests, new_tokens: int) -> tuple[float, float]:
    input_ids = torch.tensor([ids for ids, _ in requests])
    pixels = torch.cat([p for _, p in requests])
    return hf_generate_timings(model, input_ids, new_tokens, pixel_values=pixels)


def hf_generate_timings(model, input_ids: torch.Tensor, new_tokens: int, **inputs) -> tuple[float, float]:
    """transformers' time to first token (a 1-token generate) and decode tok/s for one unpadded batch."""
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(input_ids), **inputs)
    model.generate(input_ids, max_new_tokens=2, **kwargs)  # warm-up
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = time.perf_counter() - start
    return ttft, input_ids.shape[0] * (new_tokens - 1) / max(total - ttft, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=CACHE / "internvl2-1b-random")
    args = parser.parse_args()

    from transformers import InternVLForConditionalGeneration

    from vlm import LLM

    path = checkpoint(args.model)
    llm = LLM(str(path), max_num_seqs=max(args.batch), max_model_len=1024, enable_prefix_caching=False)
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    print(f"threads {torch.get_num_threads()}; one 448px tile (256 image tokens) + 27 text tokens per request")
    print(f"{'batch':>5} {'vlm TTFT':>9} {'hf TTFT':>8} {'ratio':>6} {'vlm tok/s':>10} {'hf tok/s':>9} {'ratio':>6}")
    for batch in args.batch:
        requests = [request(i) for i in range(batch)]
        with torch.inference_mode():
            hf_ttft, hf_tps = bench_transformers(hf, requests, args.new_tokens)
        vlm_ttft, vlm_tps = bench_vlm(llm, requests, args.new_tokens)
        print(
            f"{batch:>5} {vlm_ttft:>8.2f}s {hf_ttft:>7.2f}s {hf_ttft / vlm_ttft:>5.2f}x "
            f"{vlm_tps:>10.2f} {hf_tps:>9.2f} {vlm_tps / hf_tps:>5.2f}x"
        )


if __name__ == "__main__":
    main()
