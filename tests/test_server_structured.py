"""Structured outputs through `vlmrun serve` and the official `openai` client: OpenAI's
``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs`` /
``guided_*`` extra fields, on chat and text completions, streamed and not, many at once beside
unconstrained requests; a constraint that cannot compile is a 400 naming the field, and the
server goes on serving."""

from __future__ import annotations

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from vlm.testing.server import ServerProcess  # noqa: E402

# the schemas and checks of the Python API's tests (tests are not a package: load it by path)
_spec = importlib.util.spec_from_file_location(
    "_structured_cases", Path(__file__).with_name("test_structured_outputs.py")
)
assert _spec is not None and _spec.loader is not None
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CONTEXT, MAX_TOKENS, assorted_schemas, check_json = (
    _cases.CONTEXT,
    _cases.MAX_TOKENS,
    _cases.assorted_schemas,
    _cases.check_json,
)

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    model = tiny_models("qwen2", max_position_embeddings=CONTEXT)
    proc = ServerProcess(
        model, "--served-model-name", "tiny", log_path=tmp_path_factory.mktemp("server-log") / "serve.log"
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def _chat(client, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    """(text, finish_reason) of one chat completion."""
    if not stream:
        choice = client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def _completion(client, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    if not stream:
        choice = client.completions.create(model="tiny", prompt="JSON:", **kwargs).choices[0]
        return choice.text, choice.finish_reason
    text, reason = "", None
    for chunk in client.completions.create(model="tiny", prompt="JSON:", stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def _schema_request(client, i: int, schema: dict[str, Any]) -> tuple[str, str | None]:
    """Schema ``i`` sent the ways clients send one: response_format and structured_outputs (chat),
    guided_json and structured_outputs (completions), streamed and not, greedy and sampled."""
    stream = i % 2 == 1
    common: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": (0.0, 1.0)[(i // 2) % 2], "seed": i}
    way = i % 4
    if way == 0:
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": f"item_{i}", "schema": schema, "strict": True},
        }
        return _chat(client, stream, response_format=response_format, **common)
    if way == 1:
        extra = {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}
        return _chat(client, stream, extra_body=extra, **common)
    if way == 2:
        return _completion(client, stream, extra_body={"guided_json": json.dumps(schema)}, **common)
    return _completion(client, stream, extra_body={"structured_outputs": {"json": schema}}, **common)


def test_fifty_schemas_beside_free_requests(server, client):
    schemas = assorted_schemas(50, seed=5)
    with ThreadPoolExecutor(max_workers=60) as pool:  # all at once: they share the engine's batches
        constrained = [pool.submit(_schema_request, client, i, schema) for i, schema in enumerate(schemas)]
        free = [
            pool.submit(_chat, client, i % 2 == 1, max_tokens=16, temperature=(0.0, 1.0)[i % 2], seed=i)
            for i in range(10)
        ]
        for i, (future, schema) in enumerate(zip(constrained, schemas)):
            text, reason = future.result()
            assert reason == "stop", (i, text)
            check_json(text, schema)
        for future in free:
            text, reason = future.result()
            assert reason in ("stop", "length") and text is not None
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_regex_choice_grammar(client, stream):
    cases: list[tuple[Any, dict[str, Any], Any]] = [
        # any JSON object: its strings and arrays are unbounded, so greedy (sampled, a random
        # model may write one string forever)
        (
            _chat,
            {"response_format": {"type": "json_object"}, "temperature": 0},
            lambda t: isinstance(json.loads(t), dict),
        ),
    ]
    for extra, check in [
        ({"guided_regex": r"[A-Z][a-z]{1,4} [0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{1,4} [0-9]{2}", t)),
        ({"structured_outputs": {"regex": r"(ab|cd)+!"}}, lambda t: re.fullmatch(r"(ab|cd)+!", t)),
        ({"guided_choice": ["positive", "negative"]}, lambda t: t in ("positive", "negative")),
        ({"structured_outputs": {"choice": ["x", "y z"]}}, lambda t: t in ("x", "y z")),
        ({"guided_grammar": 'root ::= "[" [a-c]* "]"'}, lambda t: re.fullmatch(r"\[[a-c]*\]", t)),
    ]:
        for temperature in (0.0, 1.0):
            for send in (_chat, _completion):
                cases.append((send, {"extra_body": extra, "temperature": temperature, "seed": 2}, check))
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = [pool.submit(send, client, stream, max_tokens=MAX_TOKENS, **kwargs) for send, kwargs, _ in cases]
        for future, (_, kwargs, check) in zip(futures, cases):
            text, reason = future.result()
            assert reason == "stop" and check(text), (kwargs, text)


def _refused(client, **kwargs: Any) -> Any:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, **kwargs)
    error = info.value.body
    assert "\n" not in error["message"]
    return error


def test_bad_constraints_are_400_naming_the_field_and_the_server_goes_on(server, client):
    bad_schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 9, "maximum": 1}}}
    error = _refused(
        client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}}
    )
    assert error["param"] == "response_format"
    assert error["message"].startswith("response_format: the JSON schema cannot be used for structured outputs")
    assert "minimum greater than maximum" in error["message"]

    cases = [
        ({"extra_body": {"guided_json": {"$ref": "#/$defs/nowhere"}}}, "guided_json", "$defs"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "is not valid JSON"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", "parenthesis"),
        ({"extra_body": {"guided_grammar": "root ::= nothing_here"}}, "guided_grammar", "nothing_here"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice", "at least 1 item"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs", "exactly one"),
        ({"extra_body": {"structured_outputs": {"jsn": {}}}}, "structured_outputs.jsn", "unknown field"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
            "guided_regex",
            "response_format and guided_regex each constrain the output",
        ),
    ]
    for kwargs, param, fragment in cases:
        error = _refused(client, **kwargs)
        assert error["param"] == param and fragment in error["message"], (kwargs, error)

    text, reason = _chat(client, False, extra_body={"guided_choice": ["still", "here"]}, max_tokens=8, temperature=0)
    assert (text, reason) in (("still", "stop"), ("here", "stop"))
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_on_completions(client, stream):
    """``/v1/completions`` takes chat's ``response_format`` (json_schema and json_object)."""
    schema = assorted_schemas(3, seed=11)[2]
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}
    for temperature in (0.0, 1.0):
        text, reason = _completion(
            client,
            stream,
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=4,
            extra_body={"response_format": response_format},
        )
        assert reason == "stop", text
        check_json(text, schema)
    text, reason = _completion(
        client, stream, max_tokens=MAX_TOKENS, temperature=0, extra_body={"response_format": {"type": "json_object"}}
    )
    assert reason == "stop" and isinstance(json.loads(text), dict)


def test_completions_response_format_refusals(client):
    for extra, param, fragment in [
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
            "guided_choice",
            "response_format and guided_choice each constrain the output",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="JSON:", max_tokens=8, extra_body=extra)
        error = info.value.body
        assert error["param"] == param and fragment in error["message"] and "\n" not in error["message"], error


def test_penalties_through_the_server_equal_offline(server, client, tiny_models):
    """presence / frequency penalties (OpenAI's fields) give the offline engine's greedy tokens."""
    from vlm import LLM, SamplingParams

    llm = LLM(tiny_models("qwen2", max_position_embeddings=CONTEXT))
    prompt = "a b c d e f g"
    for penalties in (
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"frequency_penalty": -0.5, "presence_penalty": 2.0},
    ):
        served = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, **penalties)
        offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, **penalties))[0].outputs[0]
        assert served.choices[0].text == offline.text, penalties
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    strong = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, frequency_penalty=2.0)
    assert plain.choices[0].text != strong.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4, presence_penalty=2.5)
    assert info.value.body["param"] == "presence_penalty"
