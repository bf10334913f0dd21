"""vlm-plugin-qwen2vl against transformers' Qwen2-VL / Qwen2.5-VL (fp32, greedy).

For each flavor, on a tiny random checkpoint: the vision tower's features equal
``get_image_features`` for pictures of different sizes (one flat pass, window attention for
2.5); for each prompt (one picture, two pictures of different sizes, no picture) vlm's tokens
equal transformers' ``generate`` for 32 new tokens and every step's logits agree within 1e-4;
requests batched together, prefilled in chunks and preempted give what they give alone.

Both run on ``VLM_TEST_DEVICE`` (default cpu; ``cuda`` for the GPU check, scripts/gpu_check.sh);
logits and features are compared on the CPU.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.testing.logits import generate_with_logits
from vlm_plugin_qwen2vl.testing import FLAVORS, ReferenceModel, reference_inputs, write_tiny_qwen2_vl

NEW_TOKENS = 32
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")
# fp32 on both sides: vlm's dtype is pinned (on GPU "auto" means the checkpoint's dtype), and on
# CUDA no TF32 in cuBLAS or cuDNN (10-bit mantissa: errors far above the 1e-4 compared here)
ENGINE_ARGS = dict(device=DEVICE, dtype="float32")
if DEVICE.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def user(text: str, *pictures: Image.Image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "image": p} for p in pictures), {"type": "text", "text": text}],
        }
    ]


def conversations():
    # grids in merged tokens: 2x3, then 4x3 and 2x2 (windows of 2x2 cut the 4x3 one unevenly)
    return {
        "one image": user("Describe this.", picture(1, (90, 50))),
        "two images": user("Compare them.", picture(2, (84, 112)), picture(3, (60, 60))),
        "no image": [{"role": "user", "content": "Hello there, no picture today."}],
    }


@pytest.fixture(scope="module", params=FLAVORS)
def flavor(request, tmp_path_factory):
    path = str(write_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=0))
    reference = ReferenceModel.from_pretrained(path)
    reference.model.to(DEVICE)
    return request.param, path, LLM(path, **ENGINE_ARGS), reference


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)


def run(llm: LLM, prompts, params: SamplingParams) -> list[tuple[list[int], torch.Tensor]]:
    """vlm's tokens and per-step logits (on the CPU) for each prompt."""
    return [(tokens, logits.cpu()) for tokens, logits in generate_with_logits(llm, prompts, params)]


def on_device(images):
    """The images with their pixels on DEVICE, for calling the model's ``embed_images`` directly."""
    return [dataclasses.replace(image, pixel_values=image.pixel_values.to(DEVICE)) for image in images]


def reference_extra(inputs) -> dict:
    return {k: v.to(DEVICE) for k, v in reference_inputs(inputs).items()}


def reference_generate(model: ReferenceModel, inputs) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([inputs.token_ids], device=DEVICE)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **reference_extra(inputs),
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack([step[0] for step in out.logits]).cpu()


def test_vision_features_equal_transformers(flavor):
    _, _, llm, reference = flavor
    sizes = [(90, 50), (300, 17), (200, 120), (56, 56), (150, 90)]
    inputs = llm.engine.preprocess(user("All of them.", *(picture(i, size) for i, size in enumerate(sizes))))
    extra = reference_extra(inputs)
    with torch.inference_mode():
        want = reference.model.get_image_features(extra["pixel_values"], extra["image_grid_thw"]).pooler_output
        want = [w.cpu() for w in want]
        got = [g.cpu() for g in llm.engine.model.embed_images(on_device(inputs.images))]
    assert [g.shape[0] for g in got] == [image.num_tokens for image in inputs.images] == [w.shape[0] for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=0)


@pytest.mark.parametrize("case", ["one image", "two images", "no image"])
def test_greedy_tokens_and_logits_equal_transformers(flavor, case):
    _, _, llm, reference = flavor
    messages = conversations()[case]
    inputs = llm.engine.preprocess(messages)
    ref_tokens, ref_logits = reference_generate(reference, inputs)
    assert len(set(ref_tokens)) >= 8, "reference output is degenerate; parity would prove little"
    [(tokens, logits)] = run(llm, [messages], greedy())
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_batched_chunked_and_preempted_equal_alone(flavor):
    _, path, llm, _ = flavor
    prompts = list(conversations().values())
    alone = [run(llm, [p], greedy())[0] for p in prompts]
    for (tokens, logits), (alone_tokens, alone_logits) in zip(run(llm, prompts, greedy()), alone):
        assert tokens == alone_tokens
        torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=0)
    # 16-token chunks cut through the pictures' placeholders; a cache of few blocks forces preemption
    small = LLM(path, kv_cache_gib=1e-4, max_num_batched_tokens=16, **ENGINE_ARGS)
    outputs = small.generate(prompts * 2, greedy())
    assert [o.outputs[0].token_ids for o in outputs] == [tokens for tokens, _ in alone] * 2
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_cache.allocator.num_used == 0
