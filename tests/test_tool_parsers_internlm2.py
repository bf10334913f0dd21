"""InternLM2-chat's tool-call format: ``<|action_start|><|plugin|>\\n{json}<|action_end|>`` blocks.

Scripted outputs are read whole (``ToolCalling.reply``) and streamed in pieces (a character at a
time, and a token at a time with each special marker one piece, as a detokenizer sends them): the
same calls with the same arguments, the text before the first block as content, and text that is no
call to one of the request's tools (an unknown tool, bad JSON, InternLM2's code ``<|interpreter|>``
action, a half-written marker) left as content. The parser is chosen for templates that mention
InternLM2's action markers, and not for Hermes or plain templates.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from vlm.server.tools import (
    HermesToolParser,
    InternLM2ToolParser,
    JsonToolParser,
    ToolCalling,
    ToolRequest,
    choose_tool_parser,
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
    "search": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()]

#: two calls after some text, as InternLM2-chat writes them (the name key is "parameters")
OUTPUT = (
    "I will look it up.<|action_start|><|plugin|>\n"
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|action_end|>\n'
    '<|action_start|><|plugin|>\n{"name": "search", "parameters": {"query": "rain"}}<|action_end|>'
)
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("search", {"query": "rain"})]
#: how InternLM2's tokenizer cuts an output: each special marker is one token
MARKER = re.compile(r"(<\|action_start\|>|<\|plugin\|>|<\|interpreter\|>|<\|action_end\|>)")


def calling(parallel: bool = True) -> ToolCalling:
    request = ToolRequest(mode="auto", tools=TOOLS, schemas=SCHEMAS, parallel=parallel)
    return ToolCalling(request, InternLM2ToolParser())


def by_characters(text: str) -> list[str]:
    return list(text)


def by_tokens(text: str) -> list[str]:
    """Markers whole, other text in pieces of 3 characters."""
    pieces: list[str] = []
    for part in MARKER.split(text):
        if MARKER.fullmatch(part):
            pieces.append(part)
        else:
            pieces.extend(part[i : i + 3] for i in range(0, len(part), 3))
    return pieces


def streamed(calling: ToolCalling, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """``pieces`` streamed in order: (content, [(name, arguments)]) as a client sums the deltas."""
    stream = calling.stream()
    content, calls = "", []
    for i, piece in enumerate(pieces):
        delta, deltas = stream.step(piece, final=i == len(pieces) - 1)
        content += delta or ""
        for d in deltas or []:
            if d.id is not None:
                calls.append([d.function.name, ""])
            calls[d.index][1] += d.function.arguments or ""
    return content, [(name, arguments) for name, arguments in calls]


def test_plugin_blocks_become_tool_calls_whole():
    content, calls = calling().reply(OUTPUT)
    assert content == "I will look it up."
    assert calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED_CALLS
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    _, first = calling(parallel=False).reply(OUTPUT)  # parallel_tool_calls=false: the first call only
    assert first is not None and [c.function.name for c in first] == ["get_weather"]


@pytest.mark.parametrize("split", [by_characters, by_tokens])
def test_plugin_blocks_streamed_in_pieces(split):
    content, calls = streamed(calling(), split(OUTPUT))
    assert content == "I will look it up."
    assert [(name, json.loads(arguments)) for name, arguments in calls] == EXPECTED_CALLS
    _, whole = calling().reply(OUTPUT)
    assert whole is not None and calls == [(c.function.name, c.function.arguments) for c in whole]


@pytest.mark.parametrize("split", [by_characters, by_tokens])
def test_an_unclosed_last_block_and_text_after_the_calls(split):
    unclosed = '<|action_start|><|plugin|>\n{"name": "search", "parameters": {"query": "x"}}'
    content, calls = calling().reply(unclosed)
    assert content is None and calls is not None and calls[0].function.arguments == '{"query": "x"}'
    assert streamed(calling(), split(unclosed)) == ("", [("search", '{"query": "x"}')])
    text = '<|action_start|><|plugin|>{"name": "search", "parameters": {"query": "x"}}<|action_end|> then words'
    content, calls = calling().reply(text)
    assert content == " then words" and calls is not None and len(calls) == 1
    assert streamed(calling(), split(text)) == (" then words", [("search", '{"query": "x"}')])


@pytest.mark.parametrize(
    "text",
    [
        "Just text, no calls.",
        'Text <|action_start|><|plugin|>\n{"name": "unknown_tool", "parameters": {}}<|action_end|>',
        "<|action_start|><|plugin|>\n{not json}<|action_end|>",
        '<|action_start|><|plugin|>\n{"name": "search", "parameters": [1]}<|action_end|>',
        "<|action_start|><|interpreter|>\nprint(1 + 1)<|action_end|>",  # code to run: no tool call
        "a < b and <|action_st",  # a prefix of the marker, held back while streaming, then content
    ],
)
@pytest.mark.parametrize("split", [by_characters, by_tokens])
def test_text_that_is_no_call_stays_content(text, split):
    assert calling().reply(text) == (text, None)
    assert streamed(calling(), split(text)) == (text, [])


def test_the_parser_follows_the_chat_template():
    plugin_template = (
        "{% for message in messages %}{% if message['role'] == 'system' and tools %}"
        "<|im_start|>system name=<|plugin|>\n{{ tools | tojson }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    action_template = "{% if message['tool_calls'] %}<|action_start|><|plugin|>\n...<|action_end|>{% endif %}"
    assert isinstance(choose_tool_parser(plugin_template), InternLM2ToolParser)
    assert isinstance(choose_tool_parser(action_template), InternLM2ToolParser)
    assert isinstance(choose_tool_parser("{% if tools %}<tool_call>{% endif %}"), HermesToolParser)
    assert isinstance(choose_tool_parser("<|im_start|>{{ message['content'] }}<|im_end|>"), JsonToolParser)
