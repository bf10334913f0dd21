"""Prompt log-probs (``SamplingParams(prompt_logprobs=k)``) and the completions API's ``echo``.

The engine's prompt log-probs equal transformers' ``log_softmax`` of one forward over the prompt
(fp32, within 1e-4): text and Qwen2-VL prompts with a picture, alone, batched, chunked over many
steps, after a prefix-cache hit would have skipped positions, and across preemption. The server
echoes the prompt with them in OpenAI's legacy completions format (``echo``, ``logprobs``,
``max_tokens=0``, batched prompts), as lm-eval's ``local-completions`` model reads it.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river."
OTHER = "Colourless green ideas sleep furiously"


def prompt_params(k: int = 3, max_tokens: int = 1, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=k, **kw)


def reference_logprobs(model, ids: list[int], **kwargs) -> torch.Tensor:
    """``[T, V]`` log-softmax of transformers' logits over the whole prompt (row i predicts token i + 1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()
    return logits.log_softmax(-1)


def check_against(reference: torch.Tensor, ids: list[int], prompt_logprobs, k: int) -> None:
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        entry = prompt_logprobs[position]
        row = reference[position - 1]
        token = ids[position]
        assert abs(entry[token] - float(row[token])) < 1e-4, (position, entry[token], float(row[token]))
        top = torch.topk(row, k)
        expected = {int(t): float(v) for t, v in zip(top.indices, top.values)}
        assert set(entry) == set(expected) | {token}, position
        for t, v in expected.items():
            assert abs(entry[t] - v) < 1e-4


@pytest.fixture(scope="module")
def text_reference(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(tiny_qwen2, dtype="float32")


def test_text_prompt_logprobs_equal_transformers(llm, text_reference):
    [out] = llm.generate([TEXT], prompt_params(3))
    ids = out.prompt_token_ids
    assert len(ids) > 40
    check_against(reference_logprobs(text_reference, ids), ids, out.prompt_logprobs, 3)
    # k = 0: only each prompt token's own log-prob
    [zero] = llm.generate([TEXT], prompt_params(0))
    assert zero.prompt_logprobs is not None
    assert all(len(entry) == 1 for entry in zero.prompt_logprobs[1:])
    # not asked for: not computed
    [plain] = llm.generate([TEXT], SamplingParams(temperature=0, max_tokens=1))
    assert plain.prompt_logprobs is None


def test_chunked_prefill_batched_and_after_a_prefix_cache_hit(tiny_qwen2, text_reference):
    # 12 tokens a step: the long prompt takes several steps, in a batch with others
    small = LLM(tiny_qwen2, dtype="float32", max_num_batched_tokens=12)
    # the prompt's blocks are cached first: a request that wants prompt log-probs must not take them
    small.generate([TEXT], SamplingParams(temperature=0, max_tokens=2))
    before = small.engine.scheduler.num_cached_tokens
    prompts: list = [TEXT, OTHER, TEXT[:30]]
    params = [prompt_params(2, max_tokens=4), SamplingParams(temperature=0, max_tokens=4), prompt_params(5)]
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_cached_tokens == before  # no prefix was taken for them
    for out, k in ((outs[0], 2), (outs[2], 5)):
        ids = out.prompt_token_ids
        check_against(reference_logprobs(text_reference, ids), ids, out.prompt_logprobs, k)
    assert outs[1].prompt_logprobs is None
    # a request without prompt log-probs still reuses the prefix
    small.generate([TEXT], SamplingParams(temperature=0, max_tokens=2))
    assert small.engine.scheduler.num_cached_tokens > before
    assert small.engine.kv_cache.allocator.num_used == 0


def test_token_id_prompts_and_generated_tokens_match_a_teacher_forced_reference(llm, text_reference):
    ids = llm.tokenizer(OTHER)["input_ids"]
    [out] = llm.generate([ids], prompt_params(1, max_tokens=6, logprobs=1))
    check_against(reference_logprobs(text_reference, ids), ids, out.prompt_logprobs, 1)
    # the generated tokens' log-probs continue the prompt's: one reference forward over both
    generated = out.outputs[0].token_ids
    full = reference_logprobs(text_reference, ids + generated)
    assert out.outputs[0].logprobs is not None
    for i, (token, entry) in enumerate(zip(generated, out.outputs[0].logprobs)):
        assert abs(entry[token] - float(full[len(ids) - 1 + i, token])) < 1e-4


def test_preemption_recomputes_without_repeating_prompt_logprobs(tiny_qwen2, text_reference):
    # a cache of a few blocks: decodes preempt the newest sequences, which are computed again
    small = LLM(tiny_qwen2, dtype="float32", kv_cache_gib=1e-4, max_num_batched_tokens=16)
    prompts = [TEXT[:40], OTHER, TEXT[20:70], OTHER[5:]] * 2
    outs = small.generate(prompts, prompt_params(2, max_tokens=40))
    assert small.engine.scheduler.num_preemptions > 0
    for out in outs:
        ids = out.prompt_token_ids
        check_against(reference_logprobs(text_reference, ids), ids, out.prompt_logprobs, 2)


def test_bad_prompt_logprobs_name_the_field():
    from vlm.errors import ConfigError

    for value in (-1, 21):
        with pytest.raises(ConfigError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=value)


# -- a vision-language model: the picture's placeholder positions too ---------------------------


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("prompt-logprobs") / "qwen2-vl", "qwen2_vl", seed=0))


def _picture() -> Image.Image:
    picture = Image.new("RGB", (80, 56), (30, 160, 90))
    for x in range(0, 80, 8):
        for y in range(0, 56, 8):
            picture.putpixel((x, y), (250, 20 + 3 * x, 4 * y))
    return picture


def test_vlm_prompt_logprobs_with_a_picture_equal_transformers(qwen2_vl):
    from vlm_plugin_qwen2vl.testing import ReferenceModel, reference_inputs

    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _picture()}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    reference = ReferenceModel.from_pretrained(qwen2_vl)
    # whole prompt in one step, and in 8-token chunks (the picture's rows span several steps)
    for engine_args in ({}, {"max_num_batched_tokens": 8}):
        llm = LLM(qwen2_vl, dtype="float32", **engine_args)
        inputs = llm.engine.preprocess(messages)
        ids = inputs.token_ids
        image_token = llm.engine.model_config.hf_config.image_token_id
        assert ids.count(image_token) >= 4
        [out] = llm.generate([inputs], prompt_params(2))
        expected = reference_logprobs(
            reference, ids, attention_mask=torch.ones(1, len(ids)), **reference_inputs(inputs)
        )
        check_against(expected, ids, out.prompt_logprobs, 2)
        assert out.prompt_logprobs is not None
        assert all(math.isfinite(entry[t]) for entry, t in zip(out.prompt_logprobs[1:], ids[1:]) if entry)


# -- the server: echo, logprobs, max_tokens=0, batched prompts ------------------------------------


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    from vlm.testing.server import ServerProcess

    proc = ServerProcess(
        tiny_qwen2,
        "--served-model-name",
        "tiny",
        "--dtype",
        "float32",
        "--max-num-batched-tokens",
        "16",  # long prompts take several steps
        log_path=tmp_path_factory.mktemp("prompt-logprobs-server") / "serve.log",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, body: dict):
    import httpx

    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def _check_echoed(choice, llm, reference, prompt_ids: list[int], k: int) -> None:
    """An echoed prompt in OpenAI's legacy logprobs format, against transformers."""
    from vlm.server.logprobs import TokenTexts

    texts = TokenTexts(llm.tokenizer)
    lp = choice.logprobs
    n = len(prompt_ids)
    assert lp.tokens[:n] == [texts(t)[0] for t in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = reference_logprobs(reference, prompt_ids)
    for position in range(1, n):
        token = prompt_ids[position]
        assert abs(lp.token_logprobs[position] - float(expected[position - 1, token])) < 1e-4
        top = torch.topk(expected[position - 1], k)
        names = [texts(int(t))[0] for t in top.indices]
        assert set(lp.top_logprobs[position]) == set(names)
        if len(set(names)) == k:  # a dict keyed by token text: bytes that are no text alone collide
            assert list(lp.top_logprobs[position].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


def test_echo_with_max_tokens_0_returns_the_scored_prompt(client, llm, text_reference):
    response = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, logprobs=2)
    [choice] = response.choices
    ids = llm.tokenizer(TEXT)["input_ids"]
    assert choice.text == TEXT
    assert len(choice.logprobs.tokens) == len(ids)
    _check_echoed(choice, llm, text_reference, ids, 2)
    assert choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 0)


def test_echo_with_generation_continues_the_prompt(client, llm, text_reference):
    plain = client.completions.create(model="tiny", prompt=OTHER, max_tokens=5, temperature=0, logprobs=1)
    echoed = client.completions.create(model="tiny", prompt=OTHER, max_tokens=5, temperature=0, logprobs=1, echo=True)
    ids = llm.tokenizer(OTHER)["input_ids"]
    [p], [e] = plain.choices, echoed.choices
    assert e.text == OTHER + p.text
    assert e.logprobs.tokens == e.logprobs.tokens[: len(ids)] + p.logprobs.tokens
    assert e.logprobs.token_logprobs[len(ids) :] == pytest.approx(p.logprobs.token_logprobs, abs=1e-6)
    assert e.logprobs.text_offset[len(ids)] == len("".join(e.logprobs.tokens[: len(ids)]))
    _check_echoed(e, llm, text_reference, ids, 1)
    assert echoed.usage.completion_tokens == 5
    # echo without logprobs: the text only
    bare = client.completions.create(model="tiny", prompt=OTHER, max_tokens=5, temperature=0, echo=True)
    assert bare.choices[0].text == OTHER + p.text and bare.choices[0].logprobs is None


def test_batched_prompts_give_one_choice_per_prompt_in_order(client, llm):
    prompts = [OTHER, "Hello there", TEXT[:25]]
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2, echo=True)
    assert [c.index for c in response.choices] == list(range(6))
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0) for p in prompts]
    for choice in response.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text == prompt + alone[choice.index // 2].choices[0].text
    lengths = [len(llm.tokenizer(p)["input_ids"]) for p in prompts]
    assert response.usage.prompt_tokens == sum(lengths)
    assert response.usage.completion_tokens == 6 * 4
    # token-id prompts, batched
    ids = [llm.tokenizer(p)["input_ids"] for p in prompts]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone]


def test_lm_eval_loglikelihood_request_shape(server, llm, text_reference):
    """What lm-eval's ``local-completions`` sends for loglikelihood (token ids of context +
    continuation, echo, logprobs=1, max_tokens=1, a batch), read the way it reads the answer:
    ``sum(token_logprobs[ctxlen:-1])`` and greedy when each is its position's top log-prob."""
    tokenize = llm.tokenizer
    pairs = [("The quick brown", " fox"), ("Colourless green", " ideas sleep"), ("a b c", " d e f")]
    requests = [(tokenize(c)["input_ids"], tokenize(c + x)["input_ids"]) for c, x in pairs]
    for max_tokens in (1, 0):
        body = {
            "model": "tiny",
            "prompt": [full for _, full in requests],
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        }
        response = post(server, body)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert len(choices) == len(requests)
        for choice, (context, full) in zip(choices, requests):
            logprobs = choice["logprobs"]
            assert len(logprobs["token_logprobs"]) == len(full) + max_tokens
            end = len(full) if max_tokens else None  # lm-eval drops the generated token with [:-1]
            scored = logprobs["token_logprobs"][len(context) : end]
            tops = logprobs["top_logprobs"][len(context) : end]
            expected = reference_logprobs(text_reference, full)
            want = sum(float(expected[i - 1, full[i]]) for i in range(len(context), len(full)))
            assert sum(scored) == pytest.approx(want, abs=1e-4)
            greedy = all(lp == max(top.values()) for lp, top in zip(scored, tops))
            want_greedy = all(int(expected[i - 1].argmax()) == full[i] for i in range(len(context), len(full)))
            assert greedy == want_greedy


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 4, "echo": True, "stream": True}, "echo"),
        ({"prompt": ["Hi", "there"], "max_tokens": 4, "stream": True}, "prompt"),
        ({"prompt": ["Hi", ""], "max_tokens": 4}, "prompt"),
        ({"prompt": [[1, 2], []], "max_tokens": 4}, "prompt"),
        ({"prompt": ["Hi"] * 257, "max_tokens": 4}, "prompt"),
        ({"prompt": ["Hi", "x" * 3000], "max_tokens": 4}, "prompt[1]"),
        ({"prompt": [[1, 2], [1, 10**6]], "max_tokens": 4}, "prompt[1]"),
        ({"prompt": "Hi", "max_tokens": 0, "echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_refusals_name_the_field(server, body, field):
    response = post(server, {"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0
