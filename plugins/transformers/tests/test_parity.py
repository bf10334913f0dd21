"""The transformers fallback against transformers' ``generate``: same greedy tokens over 32 new
tokens, logits within 1e-4 (fp32), each request alone and all batched (pictures of different
sizes and a text-only request in one batch), and again with a tiny step budget and 4-token cache
blocks (chunked prefill, prefix caching across the runs).

Families: Phi-3 and OLMo 2 (text LLMs vlm has no plugin for; OLMo 2 normalises q and k over all
heads and its layers' outputs rather than their inputs), Idefics3 (SmolVLM's architecture), Gemma 3
(bidirectional attention over each image's tokens, sliding-window local layers) and PaliGemma
(a bidirectional prefix, 1-based positions).
"""

from __future__ import annotations

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.testing.logits import generate_with_logits

from .conftest import NEW_TOKENS, transformers_generate

PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32")
CHUNKED = dict(ENGINE, max_num_batched_tokens=12, block_size=4)


def chat(text, *images):
    return [
        {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}
    ]


def requests_for(family: str, pictures) -> list[tuple[object, dict]]:
    """(vlm prompt, transformers request) pairs; the transformers text is rendered by its processor."""
    if family in ("phi3", "olmo2"):
        texts = ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"]
        return [(t, {"text": t, "images": []}) for t in texts]
    if family == "paligemma":  # raw prompts: the processor puts the image and <bos> first
        pairs = [("caption en", pictures[0]), ("what is in the picture, tell me more", pictures[1])]
        return [({"raw": t, "images": [p]}, {"text": t, "images": [p]}) for t, p in pairs]
    messages = [
        chat("Describe this.", pictures[0]),
        chat("What is here, tell me more?", pictures[1]),
        chat("no image at all"),
    ]
    return [(m, {"chat": m}) for m in messages]


@pytest.fixture(scope="module", params=["phi3", "olmo2", "idefics3", "gemma3", "paligemma"])
def family(request, checkpoint, pictures):
    from transformers import AutoProcessor

    name = request.param
    model_dir = checkpoint(name)
    pairs = requests_for(name, pictures)
    references = []
    for _, ref in pairs:
        if "chat" in ref:
            processor = AutoProcessor.from_pretrained(model_dir)
            text = processor.apply_chat_template(ref["chat"], add_generation_prompt=True, tokenize=False)
            images = [p["image"] for p in ref["chat"][0]["content"] if p["type"] == "image"]
            ref = {"text": text, "images": images}
        references.append(ref)
    return name, model_dir, [p for p, _ in pairs], transformers_generate(model_dir, references)


def vlm_prompts(llm: LLM, prompts: list) -> list:
    """Raw prompts with images go through the preprocessor's raw_prompt (vlmrun --no-chat-template)."""
    pre = llm.engine.preprocessor
    return [pre.raw_prompt(p["raw"], p["images"]) if isinstance(p, dict) else p for p in prompts]


def assert_parity(results, references):
    for (tokens, logits), (ref_tokens, ref_logits, _) in zip(results, references, strict=True):
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_reference_output_is_varied(family):
    _, _, _, references = family
    for tokens, _, _ in references:
        assert len(set(tokens)) >= 8, tokens


def test_prompt_ids_are_the_processors(family):
    _, model_dir, prompts, references = family
    llm = LLM(model_dir, **ENGINE)
    for inputs, (_, _, ref_ids) in zip(vlm_prompts(llm, prompts), references):
        ids = inputs.token_ids if hasattr(inputs, "token_ids") else llm.engine.preprocessor(inputs).token_ids
        assert ids == ref_ids


def test_alone_and_batched(family):
    _, model_dir, prompts, references = family
    llm = LLM(model_dir, **ENGINE)
    prompts = vlm_prompts(llm, prompts)
    assert_parity(generate_with_logits(llm, prompts, PARAMS), references)
    for prompt, reference in zip(prompts, references):
        assert_parity(generate_with_logits(llm, [prompt], PARAMS), [reference])


def test_chunked_prefill_and_prefix_cache(family):
    """12-token steps and 4-token blocks: prompts run in chunks (a bidirectional span is never cut),
    and the second run takes cached prefixes (never one that ends inside a span)."""
    name, model_dir, prompts, references = family
    llm = LLM(model_dir, **CHUNKED)
    prompts = vlm_prompts(llm, prompts)
    assert_parity(generate_with_logits(llm, prompts, PARAMS), references)
    assert_parity(generate_with_logits(llm, prompts[::-1], PARAMS), references[::-1])
    if name == "paligemma":
        # the whole prompt is one span: any cached prefix would end inside it, so none is taken
        assert llm.engine.scheduler.num_cached_tokens == 0
    else:
        assert llm.engine.scheduler.num_cached_tokens > 0


def test_bidirectional_spans_matter(family):
    """Gemma 3 and PaliGemma prompts carry spans, and without them the first logits leave
    transformers' (which the tests above match): the parity depends on the spans. The other
    families are causal everywhere."""
    name, model_dir, prompts, references = family
    llm = LLM(model_dir, **ENGINE)
    prompt = vlm_prompts(llm, prompts[:1])[0]
    inputs = prompt if hasattr(prompt, "token_ids") else llm.engine.preprocessor(prompt)
    if name not in ("gemma3", "paligemma"):
        assert inputs.bidirectional_spans is None
        return
    assert inputs.bidirectional_spans
    inputs.bidirectional_spans = None
    [(_, causal)] = generate_with_logits(llm, [inputs], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert (causal[0] - references[0][1][0]).abs().max() > 1e-3
