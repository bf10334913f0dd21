"""Generation semantics: sampling, stops, streaming, batching across preemption and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.errors import InputError

PROMPTS = ["Hello", "The quick brown fox", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(tiny_qwen2)


def greedy(n=24, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=1234, ignore_eos=True)
    first = tokens(llm.generate(PROMPTS, params))
    again = tokens(llm.generate(PROMPTS, params))
    alone = [tokens(llm.generate([p], params))[0] for p in PROMPTS]
    assert first == again == alone
    other_seed = tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=24, seed=99, ignore_eos=True)))
    assert other_seed != first


def test_top_k_one_equals_greedy(llm):
    sampled = tokens(
        llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=24, seed=5, ignore_eos=True))
    )
    assert sampled == tokens(llm.generate(PROMPTS, greedy()))


def test_repetition_penalty_matches_transformers(llm, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    ref = model.generate(
        ids, do_sample=False, repetition_penalty=1.5, max_new_tokens=24, min_new_tokens=24, pad_token_id=0
    )
    ours = tokens(llm.generate([PROMPTS[1]], greedy(repetition_penalty=1.5)))[0]
    assert ours == ref[0, ids.shape[1] :].tolist()
    assert ours != tokens(llm.generate([PROMPTS[1]], greedy()))[0]


@pytest.mark.parametrize("name,kwargs", [("top_k", {"top_k": 7}), ("top_p", {"top_p": 0.6}), ("min_p", {"min_p": 0.2})])
def test_filters_keep_the_same_tokens_as_transformers(name, kwargs):
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from vlm.engine.sampler import _filter

    warper = {"top_k": TopKLogitsWarper(7), "top_p": TopPLogitsWarper(0.6), "min_p": MinPLogitsWarper(0.2)}[name]
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(300) * 3
        ours = _filter(logits.clone(), kwargs.get("top_k", 0), kwargs.get("top_p", 1.0), kwargs.get("min_p", 0.0))
        ref = warper(None, logits.clone().unsqueeze(0))[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_stop_strings_cut_the_text(llm):
    [full] = llm.generate([PROMPTS[2]], greedy(32))
    text = full.outputs[0].text
    assert len(text) > 6
    stop = text[3:5]
    cut = text[: text.find(stop)]
    [out] = llm.generate([PROMPTS[2]], greedy(32, stop=[stop, "never-appears"]))
    assert out.outputs[0].text == cut
    assert out.outputs[0].finish_reason == "stop"
    [kept] = llm.generate([PROMPTS[2]], greedy(32, stop=stop, include_stop_str_in_output=True))
    assert kept.outputs[0].text == cut + stop


def test_stop_token_ids_and_max_tokens(llm):
    [full] = llm.generate([PROMPTS[0]], greedy(16))
    assert full.outputs[0].finish_reason == "length" and len(full.outputs[0].token_ids) == 16
    stop_token = full.outputs[0].token_ids[5]
    first = full.outputs[0].token_ids.index(stop_token)
    [out] = llm.generate([PROMPTS[0]], greedy(16, stop_token_ids=[stop_token]))
    assert out.outputs[0].token_ids == full.outputs[0].token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop"


def test_min_tokens_holds_off_stop_tokens(llm):
    [full] = llm.generate([PROMPTS[0]], greedy(16))
    stop_token = full.outputs[0].token_ids[1]
    [out] = llm.generate([PROMPTS[0]], greedy(16, stop_token_ids=[stop_token], min_tokens=8))
    ids = out.outputs[0].token_ids
    assert len(ids) >= 8 and stop_token not in ids[:7]


def test_streaming_deltas_add_up_to_the_decoded_text(llm):
    params = greedy(24, stop=["zz-not-there"])
    pieces = list(llm.stream(PROMPTS[1], params))
    [out] = llm.generate([PROMPTS[1]], params)
    assert "".join(pieces) == out.outputs[0].text
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_logprobs_are_log_softmax_of_the_logits(llm):
    [out] = llm.generate([PROMPTS[0]], greedy(4, logprobs=3))
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.outputs[0].token_ids, lps):
        assert token in entry and len(entry) == 3  # greedy token is the top-1 one
        assert max(entry.values()) == entry[token] and all(v <= 0 for v in entry.values())


def test_preemption_and_chunked_prefill_keep_outputs_identical(tiny_qwen2, llm):
    expected = tokens(llm.generate(PROMPTS * 2, greedy(40)))
    # about 13 blocks of 16 tokens for 6 sequences that each need up to ~5: decodes must preempt
    small = LLM(tiny_qwen2, kv_cache_gib=1e-4, max_num_batched_tokens=16)
    assert small.engine.kv_cache.num_blocks < 20
    assert tokens(small.generate(PROMPTS * 2, greedy(40))) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_cache.allocator.num_used == 0


def test_requests_joining_a_running_batch(llm):
    """Continuous batching: a request added mid-generation gets the same tokens as alone."""
    engine = llm.engine
    alone = tokens(llm.generate(PROMPTS, greedy(20)))
    first = engine.add_request(PROMPTS[0], greedy(20))
    results = {}
    late_ids = []
    steps = 0
    while engine.has_unfinished() or not late_ids:
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 5:
            late_ids = [engine.add_request(p, greedy(20)) for p in PROMPTS[1:]]
    assert [results[first]] + [results[i] for i in late_ids] == alone
    assert engine.kv_cache.allocator.num_used == 0


def test_abort_frees_blocks(llm):
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[2], greedy(50))
    engine.step()
    assert engine.kv_cache.allocator.num_used > 0
    engine.abort(request_id)
    assert engine.kv_cache.allocator.num_used == 0 and not engine.has_unfinished()


def test_over_long_prompt_is_rejected_up_front(tiny_qwen2):
    small = LLM(tiny_qwen2, max_model_len=32)
    with pytest.raises(InputError, match="does not fit the context of 32 tokens"):
        small.generate(["x" * 40], greedy(4))
    assert small.engine.kv_cache.allocator.num_used == 0 and not small.engine.has_unfinished()
    [out] = small.generate(["x" * 20], greedy(100))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12


def test_chat_messages_are_validated(llm):
    with pytest.raises(InputError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(InputError, match="non-empty"):
        llm.generate([[]])


# -- prefix caching ---------------------------------------------------------------------------

SHARED = "You are a helpful assistant. Answer briefly and precisely. " * 2


def test_prefix_cache_hits_give_identical_outputs(tiny_qwen2):
    prompts = [SHARED + "Hello", SHARED + "What is two plus two?", SHARED + "Hello"]
    uncached = LLM(tiny_qwen2, enable_prefix_caching=False)
    expected = tokens(uncached.generate(prompts, greedy(24)))
    cached = LLM(tiny_qwen2)
    first = tokens(cached.generate(prompts[:1], greedy(24)))
    scheduler = cached.engine.scheduler
    assert scheduler.num_cached_tokens == 0
    rest = tokens(cached.generate(prompts[1:], greedy(24)))
    assert first + rest == expected
    # the shared prefix (whole 16-token blocks of it) came from the cache for both later prompts
    shared_blocks = len(cached.tokenizer(SHARED)["input_ids"]) // 16
    assert scheduler.num_cached_tokens >= 2 * shared_blocks * 16
    assert cached.engine.kv_cache.allocator.num_used == 0


def test_second_chat_turn_reuses_the_first(tiny_qwen2):
    llm = LLM(tiny_qwen2)
    turn1 = [{"role": "user", "content": "Tell me something about the sea and the wind."}]
    [reply] = llm.chat(turn1, greedy(20))
    before = llm.engine.scheduler.num_cached_tokens
    turn2 = turn1 + [{"role": "assistant", "content": reply.outputs[0].text}, {"role": "user", "content": "More?"}]
    [second] = llm.chat(turn2, greedy(20))
    first_prompt_len = len(llm.engine.preprocess(turn1).token_ids)
    assert llm.engine.scheduler.num_cached_tokens - before >= (first_prompt_len // 16) * 16 > 0
    fresh = LLM(tiny_qwen2, enable_prefix_caching=False)
    assert second.outputs[0].token_ids == fresh.chat(turn2, greedy(20))[0].outputs[0].token_ids


def test_prefix_cache_under_eviction_and_preemption(tiny_qwen2):
    prompts = [SHARED + f"question number {i}" for i in range(8)]
    expected = tokens(LLM(tiny_qwen2, enable_prefix_caching=False).generate(prompts, greedy(30)))
    small = LLM(tiny_qwen2, kv_cache_gib=2e-4, max_num_batched_tokens=32)
    for _ in range(2):  # the second round runs against a cache that the first filled and evicted
        assert tokens(small.generate(prompts, greedy(30))) == expected
    assert small.engine.scheduler.num_cached_tokens > 0
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_cache.allocator.num_used == 0


def test_text_only_model_refuses_images(llm):
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="reads text only"):
        llm.chat(messages)


def test_text_parts_render_like_a_string(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello there"}]
    assert llm.engine.preprocess(parts).token_ids == llm.engine.preprocess(plain).token_ids
