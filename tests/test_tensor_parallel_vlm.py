"""A vision-language model under ``tensor_parallel_size=2`` answers as under 1: same greedy tokens,
logits within 1e-4, for requests with one picture, two pictures and none, batched together.

Rank 0 preprocesses each request (pixels included) and broadcasts it; every rank runs the
replicated vision tower and its shard of the language model. One engine per size, module-scoped
(a process that runs a tensor-parallel engine may run no other engine until it is closed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vlm_plugin_qwen2vl")

from vlm import LLM, SamplingParams  # noqa: E402
from vlm.testing.logits import generate_with_logits  # noqa: E402
from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _user(text: str, *pictures: Image.Image) -> list[dict]:
    content = [*({"type": "image", "image": p} for p in pictures), {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


CHATS = {
    "one picture": _user("Describe this.", _picture(1, (90, 50))),
    "two pictures": _user("Compare them.", _picture(2, (60, 60)), _picture(3, (40, 100))),
    "no picture": [{"role": "user", "content": "Hello there, no picture today."}],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl-tp") / "model", "qwen2_vl"))


@pytest.fixture(scope="module")
def one_process(model_dir):
    """Tokens and logits of ``tensor_parallel_size=1`` (computed before the TP engine starts)."""
    llm = LLM(model_dir, num_threads=1)
    return dict(zip(CHATS, generate_with_logits(llm, list(CHATS.values()), PARAMS)))


@pytest.fixture(scope="module")
def two_ranks(model_dir, one_process):
    with LLM(model_dir, tensor_parallel_size=2) as llm:
        yield llm, dict(zip(CHATS, generate_with_logits(llm, list(CHATS.values()), PARAMS)))


def test_the_language_model_is_sharded_and_the_vision_tower_is_not(two_ranks):
    llm, _ = two_ranks
    model = llm.engine.model
    assert model.language_model.model.layers[0].self_attn.num_heads == 2  # of 4
    assert model.visual.blocks[0].attn.qkv.bias.shape == (3 * 32,)  # the full vision width on every rank


@pytest.mark.parametrize("case", list(CHATS))
def test_two_ranks_answer_like_one_process(two_ranks, one_process, case):
    _, results = two_ranks
    want_tokens, want_logits = one_process[case]
    got_tokens, got_logits = results[case]
    assert len(set(want_tokens)) >= 8, want_tokens  # not degenerate (one token repeated proves little)
    assert got_tokens == want_tokens
    assert got_logits.shape == want_logits.shape  # gathered over the full vocabulary
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)
