"""Qwen2-VL (and Qwen2.5-VL) forced through the fallback (``plugin="transformers"``,
``vlmrun --plugin transformers``) equals the native vlm-plugin-qwen2vl and transformers' ``generate``.

Qwen2-VL is the fallback's multimodal-rope case: its preprocessor gives ``[3, T]`` (temporal,
height, width) positions and a ``position_delta`` from the model class's own ``get_rope_index``,
and the transformers model takes them as ``[3, 1, T]`` position ids. On a tiny random checkpoint:
the same prompt ids and positions as the native plugin, then the same greedy tokens over 32 new tokens and logits
within 1e-4 (fp32) as transformers and the native plugin, for pictures of different sizes (one
request with two) and a text-only request, each alone and all batched, and batched again in
12-token chunks over 4-token cache blocks (M-RoPE positions sliced per chunk, prefixes cached).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm.testing.logits import generate_with_logits
from vlm_plugin_qwen2vl.testing import FLAVORS, load_reference_processor, write_tiny_qwen2_vl
from vlm_plugin_transformers.model import TransformersModel

from .conftest import NEW_TOKENS, transformers_generate

PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
FALLBACK = dict(device="cpu", dtype="float32", plugin="transformers")
CLI_TOKENS = 12


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


@pytest.fixture(scope="module", params=FLAVORS)
def qwen2vl(request, tmp_path_factory):
    """The checkpoint, its conversations, transformers' results and the native plugin's (batched)."""
    path = str(write_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=0))
    # merged-token grids 2x3, then 4x3 and 2x2 in one request, then none
    conversations = [
        user("Describe this.", picture(1, (90, 50))),
        user("Compare them.", picture(2, (84, 112)), picture(3, (60, 60))),
        [{"role": "user", "content": "Hello there, no picture today."}],
    ]
    processor = load_reference_processor(path)
    requests = [
        {
            "text": processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
            "images": [part["image"] for part in c[0]["content"] if isinstance(part, dict) and part["type"] == "image"],
        }
        for c in conversations
    ]
    references = transformers_generate(path, requests, processor=processor)
    native = LLM(path, device="cpu", dtype="float32")
    assert native.engine.plugin == "qwen2vl"
    native_prompts = [native.engine.preprocessor(c) for c in conversations]
    return path, conversations, references, native_prompts, generate_with_logits(native, conversations, PARAMS)


def rope_positions(inputs) -> torch.Tensor:
    """A request's [3, T] positions (the native plugin leaves a text-only prompt's implicit: 0..T-1)."""
    if inputs.positions is not None:
        return inputs.positions
    return torch.arange(len(inputs.token_ids)).expand(3, -1)


def assert_same(results, expected):
    for (tokens, logits), (expected_tokens, expected_logits, *_) in zip(results, expected, strict=True):
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_forced_fallback_equals_native_and_transformers(qwen2vl):
    path, conversations, references, native_prompts, native = qwen2vl
    llm = LLM(path, **FALLBACK)
    assert llm.engine.plugin == "transformers"
    assert isinstance(llm.engine.model, TransformersModel) and llm.engine.model.position_dims == 3
    assert all(len(set(tokens)) >= 8 for tokens, _, _ in references)  # varied output, not one repeated token

    prompts = [llm.engine.preprocessor(c) for c in conversations]
    for ours, theirs, (_, _, reference_ids) in zip(prompts, native_prompts, references):
        assert ours.token_ids == theirs.token_ids == reference_ids
        assert torch.equal(ours.positions, rope_positions(theirs))
        assert ours.position_delta == theirs.position_delta
    assert prompts[0].position_delta < 0  # image tokens share rows and columns: positions end early

    batched = generate_with_logits(llm, conversations, PARAMS)
    assert_same(batched, references)
    assert_same(batched, native)
    for conversation, reference in zip(conversations, references):
        assert_same(generate_with_logits(llm, [conversation], PARAMS), [reference])


def test_chunked_prefill_and_prefix_cache(qwen2vl):
    """12-token steps over 4-token blocks: each chunk takes its slice of the [3, T] positions, and
    the second (reversed) run starts from cached prefixes."""
    path, conversations, references, _, _ = qwen2vl
    llm = LLM(path, **FALLBACK, max_num_batched_tokens=12, block_size=4)
    assert_same(generate_with_logits(llm, conversations, PARAMS), references)
    assert_same(generate_with_logits(llm, conversations[::-1], PARAMS), references[::-1])
    assert llm.engine.scheduler.num_cached_tokens > 0


def test_vlmrun_with_plugin_transformers_equals_native(qwen2vl, tmp_path, capsys):
    path, conversations, references, _, _ = qwen2vl
    image = tmp_path / "picture.png"
    conversations[0][0]["content"][0]["image"].save(image)  # PNG: the same pixels
    args = ["--model", path, "--image", str(image), "--prompt", "Describe this.", "--temperature", "0"]
    args += ["--max-tokens", str(CLI_TOKENS)]
    assert main([*args, "--plugin", "transformers"]) == 0
    fallback = capsys.readouterr().out
    assert fallback.strip()
    assert main(args) == 0
    assert fallback == capsys.readouterr().out

    tokenizer = load_reference_processor(path).tokenizer
    tokens = references[0][0][:CLI_TOKENS]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens  # vlmrun stops at EOS
    assert fallback == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
