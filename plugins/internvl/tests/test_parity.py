"""vlm-plugin-internvl against transformers' InternVLForConditionalGeneration (fp32, greedy).

Tiny checkpoints in both layouts hold the same random weights. For each prompt (one image, two
images, no image) vlm's tokens must equal transformers' generate for 32 new tokens and every
step's logits must agree within 1e-4; batched requests with different image counts must equal
the same requests run alone.

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
from vlm_plugin_internvl.testing import load_reference_processor, write_tiny_internvl

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


def conversations():
    one = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture(1, (90, 50))}, {"type": "text", "text": "Describe this."}],
        }
    ]
    two = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture(2, (40, 120))},
                {"type": "image", "image": picture(3, (60, 60))},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    none = [{"role": "user", "content": "Hello there, no picture today."}]
    return {"one image": one, "two images": two, "no image": none}


def on_device(images):
    """The images with their pixels on DEVICE, for calling the model's ``embed_images`` directly."""
    return [dataclasses.replace(image, pixel_values=image.pixel_values.to(DEVICE)) for image in images]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    return {layout: str(write_tiny_internvl(root / layout, layout, seed=0)) for layout in ("hf", "original")}


@pytest.fixture(scope="module")
def reference_model(checkpoints):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(checkpoints["hf"], dtype=torch.float32).to(DEVICE).eval()


def reference(model, input_ids: list[int], pixel_values: torch.Tensor | None):
    """transformers' greedy tokens and per-step logits for exactly these inputs."""
    ids = torch.tensor([input_ids], device=DEVICE)
    kwargs = {} if pixel_values is None else {"pixel_values": pixel_values.to(DEVICE)}
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
            **kwargs,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack([step[0] for step in out.logits]).cpu()


def run(llm: LLM, prompts):
    """vlm greedy tokens, plus the logits each request was sampled from at every step (on the CPU)."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    return [(tokens, logits.cpu()) for tokens, logits in generate_with_logits(llm, prompts, params)]


@pytest.fixture(scope="module", params=["hf", "original"])
def engine(request, checkpoints):
    return request.param, LLM(checkpoints[request.param], **ENGINE_ARGS)


@pytest.mark.parametrize("case", ["one image", "two images", "no image"])
def test_greedy_tokens_and_logits_equal_transformers(engine, reference_model, case):
    layout, llm = engine
    messages = conversations()[case]
    inputs = llm.engine.preprocess(messages)
    pixels = torch.cat([image.pixel_values for image in inputs.images]) if inputs.images else None
    ref_tokens, ref_logits = reference(reference_model, inputs.token_ids, pixels)
    assert len(set(ref_tokens)) >= 8, "reference output is degenerate; parity would prove little"
    [(tokens, logits)] = run(llm, [messages])
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_hf_layout_inputs_come_from_transformers_processor(checkpoints):
    """For the HF layout the inputs fed to both sides are the transformers processor's own."""
    llm = LLM(checkpoints["hf"], **ENGINE_ARGS)
    processor = load_reference_processor(checkpoints["hf"])
    messages = conversations()["two images"]
    expected = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = llm.engine.preprocess(messages)
    assert ours.token_ids == expected["input_ids"][0].tolist()
    assert torch.equal(torch.cat([i.pixel_values for i in ours.images]), expected["pixel_values"])


def test_batched_requests_with_different_image_counts_equal_alone(engine):
    _, llm = engine
    prompts = list(conversations().values())
    alone = [run(llm, [p])[0] for p in prompts]
    batched = run(llm, prompts)
    for (tokens, logits), (alone_tokens, alone_logits) in zip(batched, alone):
        assert tokens == alone_tokens
        torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=0)
    assert llm.engine.kv_cache.allocator.num_used == 0


def test_layouts_agree(checkpoints):
    """Same weights in both layouts: the same image question gets the same answer."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture(7, (64, 64))}, {"type": "text", "text": "What?"}],
        }
    ]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    hf_llm, original_llm = LLM(checkpoints["hf"], **ENGINE_ARGS), LLM(checkpoints["original"], **ENGINE_ARGS)
    hf_inputs, original_inputs = hf_llm.engine.preprocess(messages), original_llm.engine.preprocess(messages)
    assert torch.equal(hf_inputs.images[0].pixel_values, original_inputs.images[0].pixel_values)
    hf_features = hf_llm.engine.model.embed_images(on_device(hf_inputs.images))[0].cpu()
    original_features = original_llm.engine.model.embed_images(on_device(original_inputs.images))[0].cpu()
    torch.testing.assert_close(hf_features, original_features, atol=1e-5, rtol=0)
    # the two layouts render chat prompts with different templates; the same prompt ids and pixels
    # must get the same answer from the same weights
    [hf_out] = hf_llm.generate([hf_inputs], params)
    [original_out] = original_llm.generate([hf_inputs], params)
    assert len(hf_out.outputs[0].token_ids) == 16
    assert hf_out.outputs[0].token_ids == original_out.outputs[0].token_ids
