"""vlm-plugin-llava against transformers' LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration (fp32, greedy), for each tiny variant (CLIP + Llama, SigLIP +
Qwen2, LLaVA-NeXT CLIP + Mistral).

For one image, two images of different sizes and no image, vlm's tokens must equal transformers'
generate for 32 new tokens and every step's logits must agree within 1e-4, on the inputs that
transformers' own processor makes; batched requests with different image sizes and counts must
equal the same requests run alone.

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
from vlm_plugin_llava.testing import VARIANTS, load_reference_processor

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


def on_device(images):
    """The images with their pixels on DEVICE, for calling the model's ``embed_images`` directly."""
    return [dataclasses.replace(image, pixel_values=image.pixel_values.to(DEVICE)) for image in images]


def user(*parts):
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


CONVERSATIONS = {
    "one image": user(picture(1, (90, 50)), "Describe this."),
    "two images": user(picture(2, (40, 120)), picture(3, (300, 70)), "Compare them."),
    # list content: the llava-hf templates read parts (a string content is rendered as parts by vlm)
    "no image": user("Hello there, no picture today."),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, llava_checkpoints):
    """(variant, engine, transformers model, transformers processor) for one tiny checkpoint."""
    from transformers import AutoModelForImageTextToText

    path = llava_checkpoints[request.param]
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    return request.param, LLM(path, **ENGINE_ARGS), reference, load_reference_processor(path)


def reference_generate(model, inputs) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and per-step logits for the processor's inputs."""
    ids = inputs["input_ids"].to(DEVICE)
    extra = {k: inputs[k].to(DEVICE) for k in ("pixel_values", "image_sizes") if k in inputs}
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
            **extra,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack([step[0] for step in out.logits]).cpu()


def run(llm: LLM, prompts):
    """vlm's tokens and per-step logits (on the CPU) for each prompt."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    return [(tokens, logits.cpu()) for tokens, logits in generate_with_logits(llm, prompts, params)]


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_greedy_tokens_and_logits_equal_transformers(variant, case):
    name, llm, model, processor = variant
    messages = CONVERSATIONS[case]
    expected = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = llm.engine.preprocess(messages)
    assert ours.token_ids == expected["input_ids"][0].tolist()
    assert ours.token_ids.count(ours.image_token_id) == sum(image.num_tokens for image in ours.images)
    ref_tokens, ref_logits = reference_generate(model, expected)
    assert len(set(ref_tokens)) >= 8, "reference output is degenerate; parity would prove little"
    [(tokens, logits)] = run(llm, [messages])
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_image_features_equal_transformers(variant):
    """embed_images, image by image, equals the features transformers writes over the placeholders."""
    name, llm, model, processor = variant
    messages = CONVERSATIONS["two images"]
    expected = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    extra = {k: expected[k].to(DEVICE) for k in ("image_sizes",) if k in expected}
    with torch.inference_mode():
        reference = model.model.get_image_features(expected["pixel_values"].to(DEVICE), **extra).pooler_output
        reference = [f.cpu() for f in reference]
        ours = [f.cpu() for f in llm.engine.model.embed_images(on_device(llm.engine.preprocess(messages).images))]
    assert [tuple(f.shape) for f in ours] == [tuple(f.shape) for f in reference]
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    if VARIANTS[name]["architecture"] == "llava_next":  # the two pictures' aspect ratios give different counts
        assert ours[0].shape[0] != ours[1].shape[0]


def test_batched_requests_with_mixed_images_equal_alone(variant):
    _, llm, _, _ = variant
    prompts = [
        CONVERSATIONS["two images"],
        user(picture(4, (17, 300)), "What is this?"),
        CONVERSATIONS["no image"],
        user(picture(5, (1000, 50)), "And this one, which is much wider?"),
        CONVERSATIONS["one image"],
    ]
    alone = [run(llm, [p])[0] for p in prompts]
    batched = run(llm, prompts)
    for (tokens, logits), (alone_tokens, alone_logits) in zip(batched, alone):
        assert tokens == alone_tokens
        torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=0)
    assert llm.engine.kv_cache.allocator.num_used == 0
