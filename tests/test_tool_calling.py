"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

The parsers are tested on scripted outputs (Hermes / Qwen ``<tool_call>`` blocks, plain JSON),
whole and streamed a character at a time. Through `vlmrun serve` and the `openai` client, a tiny
random Qwen2 whose tokenizer carries a tools-aware chat template (written here after Qwen2.5's):
``required`` and named choices always give arguments valid against the tool's schema (the output
is constrained), ``auto`` reads a scripted output (forced with a choice constraint) into
``tool_calls``, and a conversation with tool calls and results renders exactly as transformers'
``apply_chat_template(tools=...)`` renders it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from vlm.server.protocol import ChatMessage  # noqa: E402
from vlm.server.tools import (  # noqa: E402
    HermesToolParser,
    JsonToolParser,
    ToolCalling,
    ToolRequest,
    choose_tool_parser,
)
from vlm.testing.server import ServerProcess  # noqa: E402

# A chat template that renders tools, tool calls and tool results the way Qwen2.5's does.
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 12},
                "safe": {"type": "boolean"},
            },
            "required": ["query", "safe"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# -- the parsers -----------------------------------------------------------------------------------

HERMES_OUTPUT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "search", "arguments": {"query": "rain", "safe": true}}\n</tool_call>'
)


def _calling(mode: str = "auto", parser: Any = None, parallel: bool = True, function: str | None = None) -> ToolCalling:
    request = ToolRequest(mode=mode, tools=TOOLS, schemas=SCHEMAS, function=function, parallel=parallel)
    return ToolCalling(request, parser or HermesToolParser())


def _streamed(calling: ToolCalling, text: str) -> tuple[str, list[tuple[str, str]]]:
    """``text`` streamed a character at a time: (content, [(name, arguments)]) as a client sums them."""
    stream = calling.stream()
    content, calls = "", []
    for i, character in enumerate(text):
        delta, deltas = stream.step(character, final=i == len(text) - 1)
        content += delta or ""
        for d in deltas or []:
            if d.id is not None:
                calls.append([d.function.name, ""])
            calls[d.index][1] += d.function.arguments or ""
    return content, [tuple(call) for call in calls]


def test_hermes_blocks_become_tool_calls_whole_and_streamed():
    calling = _calling()
    content, calls = calling.reply(HERMES_OUTPUT)
    assert content == "Let me check.\n"
    assert calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("search", {"query": "rain", "safe": True}),
    ]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2
    streamed_content, streamed_calls = _streamed(calling, HERMES_OUTPUT)
    assert streamed_content.strip() == "Let me check."
    assert streamed_calls == [(c.function.name, c.function.arguments) for c in calls]
    # parallel_tool_calls=false: the first call only
    _, first = _calling(parallel=False).reply(HERMES_OUTPUT)
    assert first is not None and [c.function.name for c in first] == ["get_weather"]


@pytest.mark.parametrize(
    "text",
    [
        "Just text, no calls.",
        'Text <tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',  # not one of the tools
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "search", "arguments": [1]}\n</tool_call>',  # arguments not an object
        "a < b and <tool_c",  # a prefix of the marker, held back while streaming, then content
    ],
)
def test_text_that_is_no_call_stays_content(text):
    calling = _calling()
    assert calling.reply(text) == (text, None)
    assert _streamed(calling, text) == (text, [])


def test_unclosed_last_block_and_text_after_calls():
    calling = _calling()
    content, calls = calling.reply('<tool_call>\n{"name": "search", "arguments": {"query": "x", "safe": false}}\n')
    assert content is None and calls is not None and calls[0].function.arguments == '{"query": "x", "safe": false}'
    text = '<tool_call>{"name": "search", "arguments": {"query": "x", "safe": false}}</tool_call> then words'
    content, calls = calling.reply(text)
    assert content == " then words" and calls is not None and len(calls) == 1
    assert _streamed(calling, text) == (" then words", [("search", '{"query": "x", "safe": false}')])


def test_json_format_calls():
    parser = JsonToolParser()
    calling = _calling(parser=parser)
    for text, expected in [
        ('{"name": "search", "parameters": {"query": "q", "safe": true}}', [("search", {"query": "q", "safe": True})]),
        (
            '<|python_tag|>[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}, '
            '{"name": "search", "arguments": "{\\"query\\": \\"q\\", \\"safe\\": false}"}]',
            [("get_weather", {"city": "Oslo", "days": 1}), ("search", {"query": "q", "safe": False})],
        ),
    ]:
        content, calls = calling.reply(text)
        assert content is None and calls is not None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected
        assert _streamed(calling, text)[1] == [(c.function.name, c.function.arguments) for c in calls]
    for text in ["Hello {there}", '{"name": "nope", "arguments": {}}', '{"truncated": ']:
        assert calling.reply(text) == (text, None)
        assert _streamed(calling, text) == (text, [])


def test_the_parser_follows_the_chat_template():
    assert isinstance(choose_tool_parser(TOOLS_TEMPLATE), HermesToolParser)
    llama3_like = '{%- if tools %}Respond in the format {"name": function name, "parameters": ...}{% endif %}'
    assert isinstance(choose_tool_parser(llama3_like), JsonToolParser)
    assert isinstance(choose_tool_parser(None), JsonToolParser)


def test_required_and_named_constraints():
    required = ToolRequest(mode="required", tools=TOOLS, schemas=SCHEMAS, parallel=False).constraint()
    assert required is not None
    schema = required["json"]
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    good = [{"name": "search", "parameters": {"query": "q", "safe": True}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "search", "parameters": {"city": "Paris", "days": 1}}], schema)
    named = ToolRequest(mode="named", tools=TOOLS, schemas=SCHEMAS, function="search").constraint()
    assert named == {"json": SCHEMAS["search"], "disable_any_whitespace": True}
    assert ToolRequest(mode="auto", tools=TOOLS, schemas=SCHEMAS).constraint() is None


# -- rendering ------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain, 9 C"},
    {"role": "assistant", "content": "Paris: sunny. Oslo: rain."},
    {"role": "user", "content": "And Lima?"},
]


def _hf_history() -> list[dict[str, Any]]:
    """The history as transformers' templates take it: tool-call arguments as objects."""
    out = []
    for message in HISTORY:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        out.append(message)
    return out


@pytest.fixture(scope="module")
def tools_tokenizer():
    from vlm.testing.checkpoints import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


class _RenderingEngine:
    """What PromptBuilder asks of the engine, with core's text preprocessor."""

    def __init__(self, tokenizer):
        from vlm.inputs.preprocessor import TextPreprocessor

        self.preprocessor = TextPreprocessor(tokenizer)

    def preprocess(self, prompt, tools=None):
        from vlm.inputs.preprocessor import preprocess_with_tools

        return preprocess_with_tools(self.preprocessor, prompt, tools)


def test_history_renders_as_transformers_renders_it(tools_tokenizer):
    from vlm.server.prompts import PromptBuilder

    builder = PromptBuilder(_RenderingEngine(tools_tokenizer), "tiny", None, False)  # type: ignore[arg-type]
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    inputs = builder.chat(messages, [], TOOLS)
    expected = tools_tokenizer.apply_chat_template(
        _hf_history(), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert inputs.prompt == expected
    assert '"arguments": {"city": "Oslo", "days": 1}}' in expected and "<tool_response>\nrain, 9 C" in expected
    assert inputs.token_ids == tools_tokenizer(expected, add_special_tokens=False)["input_ids"]
    # no tools: the same history without the tools' system prompt
    plain = builder.chat(messages, [], None)
    assert plain.prompt == tools_tokenizer.apply_chat_template(
        _hf_history(), add_generation_prompt=True, tokenize=False
    )
    assert "# Tools" not in plain.prompt


def test_a_template_without_tools_refuses_them():
    from vlm.errors import InputError
    from vlm.inputs.preprocessor import TextPreprocessor, preprocess_with_tools
    from vlm.testing.checkpoints import build_byte_tokenizer

    preprocessor = TextPreprocessor(build_byte_tokenizer())  # plain ChatML: never reads 'tools'
    with pytest.raises(InputError, match="does not render tools") as info:
        preprocess_with_tools(preprocessor, USER, TOOLS)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="cannot render tools"):
        preprocess_with_tools(lambda prompt: None, USER, TOOLS)


# -- through the server and the openai client ------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tools_tokenizer):
    from vlm.testing.checkpoints import write_tiny_text_model

    path = write_tiny_text_model(
        tmp_path_factory.mktemp("tools-model") / "qwen2", "qwen2", max_position_embeddings=4096
    )
    tools_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(
        model_dir, "--served-model-name", "tiny", log_path=tmp_path_factory.mktemp("server-log") / "serve.log"
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def _collect_stream(client, **kwargs: Any) -> tuple[str | None, list[tuple[str, str, str]], str | None]:
    """A streamed chat completion summed as a client sums it: (content, [(id, name, arguments)], finish)."""
    content, calls, reason = None, [], None
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for call in delta.tool_calls or []:
                if call.id is not None:
                    assert call.index == len(calls) and call.type == "function"
                    calls.append([call.id, call.function.name, ""])
                calls[call.index][2] += call.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [tuple(call) for call in calls], reason


def _check_calls(calls: list[tuple[str, str]]) -> None:
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_gives_valid_calls(client, parallel):
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.0)]:
        common = dict(
            messages=USER,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=1500,
            temperature=temperature,
            seed=seed,
        )
        choice = client.chat.completions.create(model="tiny", **common).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert calls and (parallel or len(calls) == 1)
        _check_calls(calls)
        content, streamed, reason = _collect_stream(client, **common)
        assert reason == "tool_calls" and content is None
        assert [(name, arguments) for _, name, arguments in streamed] == calls  # same seed, same calls


def test_named_function_gives_its_arguments(client):
    choice_field = {"type": "function", "function": {"name": "search"}}
    for seed, temperature in [(0, 0.0), (3, 1.0)]:
        common = dict(
            messages=USER, tools=TOOLS, tool_choice=choice_field, max_tokens=300, temperature=temperature, seed=seed
        )
        choice = client.chat.completions.create(model="tiny", **common).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "search" and call.id.startswith("call_")
        _check_calls([("search", call.function.arguments)])
        content, streamed, reason = _collect_stream(client, **common)
        assert reason == "tool_calls" and content is None
        assert [(name, arguments) for _, name, arguments in streamed] == [("search", call.function.arguments)]


SCRIPTED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 3}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_models_tool_call(client, stream):
    """The model's output is scripted with a one-choice constraint; ``auto`` parses it."""
    common: dict[str, Any] = dict(messages=USER, tools=TOOLS, max_tokens=200, temperature=0)
    for script, expected_calls, expected_content in [
        (SCRIPTED, [("get_weather", '{"city": "Lima", "days": 3}')], None),
        ("Sure: " + SCRIPTED, [("get_weather", '{"city": "Lima", "days": 3}')], "Sure: "),
        ("No tool needed.", [], "No tool needed."),
    ]:
        extra = {"extra_body": {"structured_outputs": {"choice": [script]}}}
        if stream:
            content, streamed, reason = _collect_stream(client, tool_choice="auto", **common, **extra)
            calls = [(name, arguments) for _, name, arguments in streamed]
        else:
            choice = client.chat.completions.create(model="tiny", tool_choice="auto", **common, **extra).choices[0]
            content, reason = choice.message.content, choice.finish_reason
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert calls == expected_calls
        assert (content or "").strip() == (expected_content or "").strip()
        assert reason == ("tool_calls" if expected_calls else "stop")
    # tool_choice "none": the same output stays text
    extra = {"extra_body": {"structured_outputs": {"choice": [SCRIPTED]}}}
    choice = client.chat.completions.create(model="tiny", tool_choice="none", **common, **extra).choices[0]
    assert choice.message.content == SCRIPTED and choice.message.tool_calls is None and choice.finish_reason == "stop"


def test_history_with_tool_results_through_the_server(client, tools_tokenizer):
    response = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, max_tokens=5, temperature=0)
    expected = tools_tokenizer.apply_chat_template(
        _hf_history(), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert response.usage.prompt_tokens == len(tools_tokenizer(expected, add_special_tokens=False)["input_ids"])


def test_bad_tool_requests_are_400s(server, client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
            "'nope', which is not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
            "required",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "'get_weather' is given twice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
            "type 'object'",
        ),
        (
            {"tools": TOOLS, "tool_choice": named, "response_format": {"type": "json_object"}},
            "response_format",
            "send only one",
        ),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", "must be 'none', 'auto', 'required'"),
    ]
    bad_history = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}],
        },
        {"role": "user", "content": "hi"},
    ]
    cases.append(({"messages": bad_history, "tools": TOOLS}, "messages[0].tool_calls[0].function.arguments", "JSON"))
    for extra, param, message in cases:
        body = {"messages": USER, **extra}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", max_tokens=4, **body)
        error = info.value.body
        assert error["param"] == param, (extra, error)
        assert message in error["message"] and "\n" not in error["message"], error
    # and the server goes on serving
    ok = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=300, temperature=0
    )
    assert ok.choices[0].finish_reason == "tool_calls"
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0
