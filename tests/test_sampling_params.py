"""SamplingParams: vLLM's names and defaults, and one-line errors that name the bad field."""

from __future__ import annotations

import pytest

from vlm import SamplingParams
from vlm.errors import ConfigError


def test_defaults():
    p = SamplingParams()
    assert p.max_tokens == 256
    assert p.min_tokens == 0
    assert p.temperature == 1.0
    assert p.top_k == 0
    assert p.top_p == 1.0
    assert p.min_p == 0.0
    assert p.repetition_penalty == 1.0
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.include_stop_str_in_output is False
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.greedy is False


def test_defaults_are_not_shared_between_instances():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_stop_string_becomes_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop=None).stop == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_invalid_value_is_one_line_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{field}'" in message
    # the rejected value is shown so the user sees what was wrong
    assert repr(next(iter(kwargs.values()))) in message


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ConfigError) as info:
        SamplingParams(min_tokens=5, max_tokens=3)
    message = str(info.value)
    assert "\n" not in message
    assert "min_tokens (5)" in message and "max_tokens (3)" in message
    # the boundary is allowed
    assert SamplingParams(min_tokens=3, max_tokens=3).min_tokens == 3


def test_misspelled_field_suggests_the_real_one():
    with pytest.raises(ConfigError) as info:
        SamplingParams(temprature=0.5)
    assert "unknown field" in str(info.value)
    assert "did you mean 'temperature'" in str(info.value)


def test_boundaries_accepted():
    p = SamplingParams(temperature=0, top_p=1.0, top_k=-1, logprobs=20, max_tokens=1, min_p=1.0)
    assert (p.temperature, p.top_p, p.top_k, p.logprobs, p.max_tokens) == (0.0, 1.0, -1, 20, 1)
    assert SamplingParams(logprobs=0).logprobs == 0


def test_assignment_is_validated_too():
    p = SamplingParams()
    with pytest.raises(ConfigError) as info:
        p.temperature = -3
    assert "\n" not in str(info.value) and "'temperature'" in str(info.value)
    assert p.temperature == 1.0
    p.temperature = 0.5
    assert p.temperature == 0.5


@pytest.mark.parametrize(
    "kwargs, greedy",
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_k": 50}, True),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 0.7, "top_k": 2}, False),
        ({"temperature": 1.0, "top_k": -1}, False),
    ],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy
