"""Structured outputs through the Python API and the CLI: JSON schemas, json_object, regex,
choice and grammars constrain the output of a random-weight model (which on its own writes
anything), in batches shared with unconstrained requests, greedy and sampled, across preemption;
a constraint the library cannot compile is a one-line error; matchers do not outlive requests.

The server's side is ``tests/test_server_structured.py``; both draw their schemas from
:func:`assorted_schemas` here.
"""

from __future__ import annotations

import gc
import json
import random
import re
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from vlm import LLM, SamplingParams  # noqa: E402
from vlm.engine.structured import StructuredOutputError, num_live_states  # noqa: E402
from vlm.errors import ConfigError, InputError  # noqa: E402
from vlm.sampling_params import StructuredOutputsParams  # noqa: E402

# room for JSON whose whitespace the model chooses (the tiny default has 512 positions)
CONTEXT = 2048
MAX_TOKENS = 1500


def _scalar(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "boolean", "enum", "const", "nullable"])
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 6)}
        if rng.random() < 0.5:
            schema["minLength"] = 1
        return schema
    if kind == "integer":
        low = rng.randint(-100, 10)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 900)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 7, True, None, "a b"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 3, False])}
    return {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.2:
        return {"type": "array", "items": _scalar(rng), "maxItems": rng.randint(1, 3), "minItems": rng.randint(0, 1)}
    if roll < 0.35 and depth < 2:
        return _object(rng, depth + 1, rng.randint(1, 3))
    return _scalar(rng)


def _object(rng: random.Random, depth: int, size: int) -> dict[str, Any]:
    names = rng.sample(["name", "age", "ok", "color", "tags", "id", "kind", "meta", "count", "x_y"], size)
    properties = {name: _value(rng, depth) for name in names}
    required = names if rng.random() < 0.7 else rng.sample(names, rng.randint(1, size))
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def assorted_schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` JSON schemas: objects with required string / integer / boolean / enum / const /
    nullable / array fields and nested objects, every string, number and array bounded (a random
    model would otherwise write one forever)."""
    rng = random.Random(seed)
    return [_object(rng, 0, rng.randint(1, 5)) for _ in range(count)]


def check_json(text: str, schema: dict[str, Any]) -> Any:
    """``text`` parses as strict JSON (no raw control characters) and validates against ``schema``."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models("qwen2", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, max_num_seqs=128)  # the 70 requests of the batch test run as one batch


# -- the parameters ------------------------------------------------------------------------------


def test_params_take_exactly_one_constraint():
    assert StructuredOutputsParams(json={"type": "object"}).kind == "json"
    assert StructuredOutputsParams(json='{"type": "object"}').json_schema == {"type": "object"}
    assert SamplingParams(structured_outputs={"choice": ["a", "b"]}).structured_outputs.kind == "choice"
    # what tool calling builds on: a function's parameters schema as a constraint
    from vlm.engine.structured import json_schema_constraint

    tool = json_schema_constraint('{"type": "object", "properties": {"q": {"type": "string"}}}', compact=True)
    assert tool.kind == "json" and tool.json_schema["properties"] == {"q": {"type": "string"}}
    assert tool.disable_any_whitespace
    for values, message in [
        ({}, "exactly one of json, json_object, regex, choice, grammar (got none)"),
        ({"json": {}, "regex": "a"}, "(got json and regex)"),
        ({"json": "[1]"}, "'json': a JSON schema must be a JSON object, not list"),
        ({"json": "{x"}, "'json': is not valid JSON"),
        ({"choice": [""]}, "'choice': choices must not be empty strings"),
        ({"regexp": "a"}, "'regexp': unknown field"),
    ]:
        with pytest.raises(ConfigError) as info:
            StructuredOutputsParams(**values)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_masks_agree_on_cpu_kernel_and_torch_fallback():
    """The xgrammar CPU kernel (fp32 logits) and the torch unpacking used on other devices / dtypes."""
    import torch

    from vlm.engine.structured import StructuredOutputs, apply_token_masks
    from vlm.testing.checkpoints import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    structured = StructuredOutputs(tokenizer, vocab_size=300, stop_token_ids={tokenizer.eos_token_id})
    states = {
        1: structured.matcher(StructuredOutputsParams(regex="[0-9]+x")),
        2: structured.matcher(StructuredOutputsParams(choice=["yes", "no"])),
    }
    logits = torch.randn(3, 300)
    fast, slow = logits.clone(), logits.double()
    assert apply_token_masks(fast, states) == {} and apply_token_masks(slow, states) == {}
    assert torch.equal(fast.isinf(), slow.isinf()) and torch.equal(fast[0], logits[0])  # row 0 is free
    allowed = [tokenizer.decode([t]) for t in torch.nonzero(~fast[1].isinf()).flatten().tolist()]
    assert sorted(allowed) == list("0123456789")
    assert sorted(tokenizer.decode([t]) for t in torch.nonzero(~fast[2].isinf()).flatten().tolist()) == ["n", "y"]
    assert fast[1, 259:].isinf().all()  # ids past the tokenizer are never allowed


def test_json_strings_refuse_raw_control_characters():
    """xgrammar's length-bounded strings let U+0000..U+001F through; vlm's grammar does not."""
    from vlm.engine.structured import StructuredOutputs
    from vlm.testing.checkpoints import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    structured = StructuredOutputs(tokenizer, vocab_size=300, stop_token_ids={tokenizer.eos_token_id})
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}
    for text, ok in [('{"s": "a\x0cb"}', False), ('{"s": "a\tb"}', False), ('{"s": "é b"}', True)]:
        state = structured.matcher(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
        accepted = all(state.accept(t) for t in tokenizer.encode(text))
        assert accepted == ok, text


# -- generation ----------------------------------------------------------------------------------


def test_fifty_schemas_batched_with_free_requests(llm):
    """50 assorted schemas (compact and free whitespace, greedy and sampled) share batches with
    unconstrained requests and json_object / regex / choice ones; every constrained output is
    complete and valid; the free requests get what they get in a batch of their own."""
    schemas = assorted_schemas(50)
    prompts, params, checks = [], [], []
    for i, schema in enumerate(schemas):
        spec = StructuredOutputsParams(json=schema, disable_any_whitespace=i % 4 != 0)
        prompts.append(f"Describe item {i} as JSON.")
        params.append(
            SamplingParams(max_tokens=MAX_TOKENS, temperature=(0.0, 1.0)[i % 2], seed=i, structured_outputs=spec)
        )
        checks.append(lambda text, schema=schema: check_json(text, schema))
        if i % 5 == 0:  # free requests in between
            prompts.append(f"Tell a story {i}.")
            params.append(SamplingParams(max_tokens=12, temperature=0.0))
            checks.append(None)
    others = [
        ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
        ({"regex": r"[a-z]{2,5}-[0-9]{3}"}, lambda text: re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", text)),
        ({"choice": ["yes", "no", "maybe so"]}, lambda text: text in ("yes", "no", "maybe so")),
        ({"grammar": 'root ::= "(" [0-9] ("," [0-9])* ")"'}, lambda text: re.fullmatch(r"\([0-9](,[0-9])*\)", text)),
        ({"grammar": 'start: "on" | "off"'}, lambda text: text in ("on", "off")),  # Lark
    ]
    for temperature in (0.0, 1.0):
        for constraint, check in others:
            prompts.append("Answer.")
            params.append(
                SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=3, structured_outputs=constraint)
            )
            checks.append(check)

    outputs = llm.generate(prompts, params)
    free = [i for i, check in enumerate(checks) if check is None]
    without_constraints = llm.generate([prompts[i] for i in free], [params[i] for i in free])
    assert [outputs[i].outputs[0].token_ids for i in free] == [o.outputs[0].token_ids for o in without_constraints]
    for output, check, param in zip(outputs, checks, params):
        completion = output.outputs[0]
        if check is None:
            continue
        assert completion.finish_reason == "stop", (completion.text, param.structured_outputs)
        assert check(completion.text), (completion.text, param.structured_outputs)
    assert num_live_states() == 0


def test_outputs_survive_preemption(model, llm):
    """A preempted request is recomputed from its output tokens: its matcher needs no rollback, and
    the outputs (greedy and seeded) equal those of an engine that never preempts."""
    schemas = assorted_schemas(8, seed=1)
    params = [
        SamplingParams(
            max_tokens=300,
            temperature=(0.0, 0.9)[i % 2],
            seed=i,
            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        )
        for i, schema in enumerate(schemas)
    ]
    prompts = [f"Item {i}:" for i in range(len(params))]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    # 7 blocks of 16 tokens for 8 sequences of up to ~80: decodes must preempt
    small = LLM(model, kv_cache_gib=6e-5, max_num_batched_tokens=16)
    outputs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output, schema in zip(outputs, schemas):
        check_json(output.outputs[0].text, schema)
    assert small.engine.kv_cache.allocator.num_used == 0


def test_grammar_end_stops_despite_min_tokens_and_ignore_eos(llm):
    """The grammar's end ends the request ("stop"), whatever min_tokens or ignore_eos say."""
    choice = StructuredOutputsParams(choice=["yes", "no"])
    for extra in ({"min_tokens": 10}, {"ignore_eos": True}):
        for temperature in (0.0, 1.0):
            [out] = llm.generate(
                ["?"], SamplingParams(max_tokens=20, temperature=temperature, structured_outputs=choice, **extra)
            )
            assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in ("yes", "no"), extra


def test_constraint_that_cannot_compile_is_one_line_and_engine_serves_on(llm):
    bad = [
        ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "JSON schema cannot be used", "minimum greater"),
        ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "JSON schema", "$defs"),
        ({"regex": "(ab"}, "regex cannot be used", "parenthesis"),
        ({"grammar": "root ::= undefined_rule"}, "grammar cannot be used", "undefined_rule"),
    ]
    for constraint, *fragments in bad:
        with pytest.raises(StructuredOutputError) as info:
            llm.generate(["Hi", "there"], SamplingParams(max_tokens=4, structured_outputs=constraint))
        message = str(info.value)
        assert isinstance(info.value, InputError) and "\n" not in message
        assert all(fragment in message for fragment in fragments), message
        assert not re.search(r"\.cc:\d+", message), message  # the library's log prefix is gone
    assert llm.engine.unfinished_request_ids() == []
    [out] = llm.generate(
        ["Hi"], SamplingParams(max_tokens=20, temperature=0, structured_outputs={"choice": ["a", "b"]})
    )
    assert out.outputs[0].text in ("a", "b")
    assert num_live_states() == 0


def test_matchers_are_freed_on_finish_and_abort(llm):
    gc.collect()
    assert num_live_states() == 0
    engine = llm.engine
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string", "maxLength": 200}}})
    ids = [
        engine.add_request("Go", SamplingParams(max_tokens=400, temperature=1.0, seed=i, structured_outputs=spec))
        for i in range(3)
    ]
    assert num_live_states() == 3
    for _ in range(3):
        engine.step()
    for request_id in ids:
        engine.abort(request_id)
    assert not engine.has_unfinished()
    gc.collect()
    assert num_live_states() == 0


def test_stream_yields_the_constrained_text(llm):
    schema = assorted_schemas(1, seed=7)[0]
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, structured_outputs={"json": schema, "disable_any_whitespace": True}
    )
    pieces = list(llm.stream("JSON please:", params))
    check_json("".join(pieces), schema)


# -- the CLI (in-process, as tests/test_cli.py runs it: a subprocess pays for importing torch) ---------


def test_cli_json_schema_flag(model, tmp_path, capsys):
    from vlm.cli.main import main

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    args = ["--model", model, "--prompt", "hi", "--temperature", "0", "--max-tokens", str(MAX_TOKENS)]
    assert main([*args, "--json-schema", str(path)]) == 0
    check_json(capsys.readouterr().out.removesuffix("\n"), schema)

    (tmp_path / "bad.json").write_text('{"type": "integer", "minimum": 3, "maximum": 1}')
    (tmp_path / "broken.json").write_text("{not json")
    for name, expected in [
        ("bad.json", "error: the JSON schema cannot be used for structured outputs: Invalid range"),
        ("broken.json", "not valid JSON"),
        ("missing.json", "cannot read it"),
    ]:
        assert main([*args, "--json-schema", str(tmp_path / name)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
