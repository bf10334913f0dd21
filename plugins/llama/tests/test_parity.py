"""vlm-plugin-llama against transformers: same greedy tokens, logits within 1e-4 (fp32).

Each family gets a tiny random checkpoint written by transformers. Prompts have different
lengths; vlm runs them alone and batched, transformers runs each alone, EOS ignored on both sides.

Both run on ``VLM_TEST_DEVICE`` (default cpu; ``cuda`` for the GPU check, scripts/gpu_check.sh);
logits are compared on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.testing.logits import generate_with_logits

NEW_TOKENS = 32
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")
# fp32 on both sides: vlm's dtype is pinned (on GPU "auto" means the checkpoint's dtype), and on
# CUDA no TF32 in cuBLAS or cuDNN (10-bit mantissa: errors far above the 1e-4 compared here)
ENGINE_ARGS = dict(device=DEVICE, dtype="float32")
if DEVICE.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

PROMPTS = ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"]


def reference(model_dir: str, prompts: list[str]):
    """transformers greedy tokens and per-step logits for each prompt run alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(DEVICE)
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        results.append((tokens, torch.stack([step[0] for step in out.logits]).cpu()))
    return results


def run_capturing_logits(llm: LLM, prompts):
    """vlm greedy tokens, plus the logits each request was sampled from at every step (on the CPU)."""
    results = generate_with_logits(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [(tokens, logits.cpu()) for tokens, logits in results]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def family(request, tiny_models):
    model_dir = tiny_models(request.param)
    return model_dir, reference(model_dir, PROMPTS), LLM(model_dir, **ENGINE_ARGS)


def test_reference_output_is_varied(family):
    """Parity on a degenerate (one repeated token) output would prove little."""
    _, ref, _ = family
    for tokens, _ in ref:
        assert len(set(tokens)) >= 8, tokens


def test_greedy_tokens_and_logits_alone(family):
    model_dir, ref, llm = family
    for prompt, (ref_tokens, ref_logits) in zip(PROMPTS, ref):
        [(tokens, logits)] = run_capturing_logits(llm, [prompt])
        assert tokens == ref_tokens
        assert logits.shape == ref_logits.shape
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_greedy_tokens_and_logits_batched(family):
    _, ref, llm = family
    results = run_capturing_logits(llm, PROMPTS)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(results, ref):
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert llm.engine.kv_cache.allocator.num_used == 0


def test_chat_template_matches_transformers(family):
    """Messages are rendered with the tokenizer's own chat template, token for token."""
    from transformers import AutoTokenizer

    model_dir, _, llm = family
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert llm.engine.preprocess(messages).token_ids == list(expected)
