"""Repetition, presence and frequency penalties: the batched sampler against a hand computation
(OpenAI's rule: ``logit - frequency * count - presence * (count > 0)`` over the output tokens) and
against transformers' ``RepetitionPenaltyLogitsProcessor``; validated ranges; through the server."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.engine.sampler import apply_penalties, sample
from vlm.errors import ConfigError


@dataclass
class _Seq:
    """What the sampler reads of a sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    grammar: None = None
    generator: torch.Generator | None = None


VOCAB = 12


def _hand_penalized(logits: torch.Tensor, seq: _Seq) -> torch.Tensor:
    """One row, token by token, as the definitions say."""
    out = logits.clone()
    p = seq.params
    for token in range(VOCAB):
        value = float(out[token])
        if token in seq.prompt_token_ids or token in seq.output_token_ids:
            value = value * p.repetition_penalty if value < 0 else value / p.repetition_penalty
        count = seq.output_token_ids.count(token)
        value -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        out[token] = value
    return out


def test_batched_penalties_equal_the_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB) * 3
    seqs = [
        _Seq(SamplingParams(presence_penalty=0.5), [1, 2], [3, 3, 4]),
        _Seq(SamplingParams(frequency_penalty=1.5), [0], [5, 5, 5, 6, 0]),
        _Seq(SamplingParams(), [1], [1, 1]),  # no penalty: untouched
        _Seq(
            SamplingParams(repetition_penalty=1.3, presence_penalty=-1.0, frequency_penalty=0.25),
            [7, 8, 8],
            [8, 9, 9, 11],
        ),
        _Seq(SamplingParams(frequency_penalty=-2.0, presence_penalty=2.0), [2], []),  # nothing generated yet
    ]
    expected = torch.stack([_hand_penalized(logits[i], seq) for i, seq in enumerate(seqs)])
    got = apply_penalties(logits, seqs)  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[2], logits[2]) and torch.equal(got[4], logits[4])
    # the numbers themselves, for the first row: token 3 twice (0.5 once), token 4 once
    assert float(got[0, 3]) == pytest.approx(float(logits[0, 3]) - 0.5)
    assert float(got[0, 4]) == pytest.approx(float(logits[0, 4]) - 0.5)
    assert float(got[1, 5]) == pytest.approx(float(logits[1, 5]) - 4.5)


def test_repetition_penalty_equals_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 2
    histories = [([1, 4, 4], [6]), ([0, 11], [2, 3]), ([5], [])]
    seqs = [_Seq(SamplingParams(repetition_penalty=r), p, o) for (p, o), r in zip(histories, (1.7, 0.6, 1.2))]
    got = apply_penalties(logits, seqs)  # type: ignore[arg-type]
    for i, ((prompt, output), seq) in enumerate(zip(histories, seqs)):
        processor = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)
        expected = processor(torch.tensor([prompt + output]), logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], expected, rtol=0, atol=1e-6)


def test_penalties_decide_greedy_tokens_in_a_mixed_batch():
    logits = torch.tensor([[0.0, 5.0, 4.0, 0.0], [0.0, 5.0, 4.0, 0.0]])
    seqs = [
        _Seq(SamplingParams(temperature=0, frequency_penalty=0.6), [0], [1, 1]),  # 5 - 1.2 < 4: token 2
        _Seq(SamplingParams(temperature=0), [0], [1, 1]),  # free: token 1
    ]
    tokens, _, failed = sample(logits, seqs, eos_token_ids=set())  # type: ignore[arg-type]
    assert tokens == [2, 1] and not failed


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_ranges(name):
    assert getattr(SamplingParams(**{name: -2.0}), name) == -2.0
    for bad in (2.01, -3):
        with pytest.raises(ConfigError, match=name) as info:
            SamplingParams(**{name: bad})
        assert "\n" not in str(info.value)


def test_presence_penalty_changes_generation(tiny_qwen2):
    llm = LLM(tiny_qwen2)
    prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z"
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    penalized = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=2.0)
    )[0].outputs[0]
    assert penalized.token_ids != plain.token_ids
    # the strongest presence penalty on a repetitive random model: fewer repeats
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
