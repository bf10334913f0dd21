"""One bad request must never hurt another (issue 12, part 1: poison-proof batches).

The values that used to break a whole batch (a temperature of 1e-45, a repetition penalty of
1e-300, stop token ids outside the vocabulary, a 70-bit seed) are refused or handled at
admission, and a row of the batch that still cannot be sampled fails that request alone: the
other requests of the same step get the tokens they get alone.
"""

from __future__ import annotations

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.config import ConfigError
from vlm.engine.sampler import sample
from vlm.errors import InputError

GOOD = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("repetition_penalty", 1e-300, "repetition_penalty"),
        ("stop_token_ids", [-1000], "stop_token_ids"),
        ("seed", 2**70, "seed"),
        ("seed", -(2**70), "seed"),
    ],
)
def test_values_that_broke_a_batch_are_one_line_errors(field, value, needle):
    with pytest.raises(ConfigError) as err:
        SamplingParams(**{field: value})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_vanishing_temperature_samples_greedily(tiny_qwen2):
    params = SamplingParams(temperature=1e-45, max_tokens=8, ignore_eos=True)
    assert params.greedy
    llm = LLM(tiny_qwen2)
    [tiny] = llm.generate(["Hello"], params)
    [greedy] = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_admission(tiny_qwen2):
    llm = LLM(tiny_qwen2)
    vocab = llm.engine.model_config.text.vocab_size
    with pytest.raises(InputError, match=r"stop_token_ids must be in \[0, "):
        llm.engine.add_request("Hello", SamplingParams(stop_token_ids=[vocab + 5], min_tokens=3))
    assert not llm.engine.has_unfinished()


def _seq(params):
    from types import SimpleNamespace

    return SimpleNamespace(params=params, output_token_ids=[], prompt_token_ids=[1, 2], generator=torch.Generator())


def test_sampler_fails_a_non_finite_row_alone():
    logits = torch.randn(3, 50)
    logits[1] = float("nan")
    params = SamplingParams(temperature=0.7, seed=1)
    tokens, _, failed = sample(logits, [_seq(params), _seq(params), _seq(params)], eos_token_ids=set())
    assert set(failed) == {1} and "sampling failed for this request alone" in failed[1]
    assert tokens[1] == -1 and all(0 <= t < 50 for i, t in enumerate(tokens) if i != 1)


def test_a_poisoned_request_fails_alone_and_its_neighbours_get_their_tokens(tiny_qwen2, monkeypatch):
    llm = LLM(tiny_qwen2)
    prompts = ["Hello", "The quick brown fox", "1, 2, 3", "Once upon", "Poison"]
    alone = {p: llm.generate([p], GOOD)[0].outputs[0].token_ids for p in prompts[:4]}

    engine = llm.engine
    execute = engine.runner.execute

    def poisoned_execute(step):
        logits, seqs = execute(step)
        if logits is None:
            return logits, seqs
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if seq.inputs.prompt == "Poison":
                logits[i] = float("nan")  # what an overflowing row looks like to the sampler
        return logits, seqs

    monkeypatch.setattr(engine.runner, "execute", poisoned_execute)
    outputs = llm.generate(prompts, GOOD)
    for prompt, output in zip(prompts[:4], outputs[:4]):
        assert output.outputs[0].token_ids == alone[prompt]
        assert output.outputs[0].finish_reason == "length" and output.outputs[0].error is None
    poisoned = outputs[4].outputs[0]
    assert poisoned.finish_reason == "error" and "sampling failed for this request alone" in poisoned.error
    assert poisoned.token_ids == []
    assert engine.kv_cache.allocator.num_used == 0 and not engine.has_unfinished()
