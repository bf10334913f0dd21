"""`vlmrun serve` against the real `openai` client, and AsyncEngine in-process.

One server subprocess (127.0.0.1, a free port picked by the OS, an API key, an allowed media
directory) serves the tiny Qwen2 checkpoint for the whole module; every answer is compared with
what the offline engine (`vlm.LLM`) gives for the same greedy parameters.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from vlm.testing.server import ServerProcess  # noqa: E402

API_KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "Tell me a story about a robot."}]


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (32, 24), (10, 200, 30)).save(root / "inside.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_qwen2, media_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "serve.log"
    proc = ServerProcess(
        tiny_qwen2,
        "--api-key",
        API_KEY,
        "--allowed-media-dir",
        str(media_dir),
        "--served-model-name",
        "tiny",
        log_path=log,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    from vlm import LLM

    return LLM(tiny_qwen2)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def offline(llm, messages=MESSAGES, **params):
    from vlm import SamplingParams

    return llm.chat(messages, SamplingParams(**params))[0].outputs[0]


def post(server, path: str, body, key: str | None = API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (str, bytes)):
        return httpx.post(
            f"{server.url}{path}",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
            timeout=60,
            **kwargs,
        )
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


# -- the happy paths ------------------------------------------------------------------------------


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 512


def test_chat_non_streaming_equals_offline(server, client, llm):
    expected = offline(llm, temperature=0, max_tokens=24)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert len(set(expected.token_ids)) >= 8, "the tiny model's output should be varied"


def test_text_parts_equal_offline(server, client, llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Two parts, "}, {"type": "text", "text": "one turn."}]},
    ]
    expected = offline(llm, messages, temperature=0, max_tokens=12)
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert response.choices[0].message.content == expected.text


def test_chat_streaming_equals_offline(server, client, llm):
    expected = offline(llm, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_completion_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_n_with_seeds_equals_offline(server, client, llm):
    from vlm import SamplingParams

    params = dict(temperature=0.9, top_p=0.95, max_tokens=16)
    expected = llm.generate([MESSAGES, MESSAGES], [SamplingParams(seed=7, **params), SamplingParams(seed=8, **params)])
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=7, **params)
    texts = [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [e.outputs[0].text for e in expected]
    assert texts[0] != texts[1]
    assert response.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=7, stream=True, **params))
    streamed = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_stop_strings(server, client, llm):
    full = offline(llm, temperature=0, max_tokens=24).text
    printable = [
        i for i in range(4, len(full) - 2) if full[i : i + 2].isprintable() and "\ufffd" not in full[i : i + 2]
    ]
    assert printable, f"no printable stop candidate in {full!r}"
    stop = full[printable[0] : printable[0] + 2]
    expected = offline(llm, temperature=0, max_tokens=24, stop=[stop, "never-there"])
    assert expected.finish_reason == "stop" and stop not in expected.text and len(expected.text) < len(full)
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop, "never-there"]
    )
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_logprobs(server, client, llm):
    expected = offline(llm, temperature=0, max_tokens=8, logprobs=3)
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == len(expected.token_ids)
    for entry, token_id, reference in zip(content, expected.token_ids, expected.logprobs):
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(reference[token_id], abs=1e-4)
        assert entry.logprob == pytest.approx(values[0], abs=1e-6)  # greedy picks the most likely
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_completions_endpoint(server, client, llm):
    from vlm import SamplingParams

    expected = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    response = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=2
    )
    assert response.choices[0].text == expected.text
    assert len(response.choices[0].logprobs.tokens) == len(expected.token_ids)
    stream = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text


def test_metrics(server, client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = server.metrics()
    for name in (
        "vlm_num_requests_waiting",
        "vlm_num_requests_running",
        "vlm_kv_cache_blocks_used",
        "vlm_kv_cache_blocks_total",
        "vlm_generation_tokens_total",
        "vlm_prompt_tokens_total",
        "vlm_generation_tokens_per_second",
        "vlm_time_to_first_token_seconds_count",
        'vlm_requests_total{outcome="completed"}',
        'vlm_requests_total{outcome="rejected"}',
    ):
        assert name in values, name
    assert values["vlm_kv_cache_blocks_total"] > 0
    assert values["vlm_generation_tokens_total"] >= 4
    assert values['vlm_requests_total{outcome="completed"}'] >= 1
    assert values["vlm_time_to_first_token_seconds_count"] >= 1
    assert "# TYPE vlm_time_to_first_token_seconds histogram" in response.text


def test_api_key(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    for key in (None, "wrong-key"):
        response = post(server, "/v1/chat/completions", body, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert post(server, "/v1/chat/completions", body).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key


def _image_message(url: str) -> dict:
    return {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ],
    }


def _bad_requests(media_dir: Path, outside: Path) -> list[tuple[str, object, str | None, int]]:
    ok = {"model": "tiny", "messages": MESSAGES}
    image_param = "messages[0].content[0].image_url"
    return [
        ("negative temperature", {**ok, "temperature": -1}, "temperature", 400),
        ("top_p above 1", {**ok, "top_p": 2}, "top_p", 400),
        ("empty messages", {**ok, "messages": []}, "messages", 400),
        ("unknown role", {**ok, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", 400),
        ("max_tokens 0", {**ok, "max_tokens": 0}, "max_tokens", 400),
        ("over-long prompt", {**ok, "messages": [{"role": "user", "content": "x" * 3000}]}, "messages", 400),
        ("max_tokens beyond the context", {**ok, "max_tokens": 100_000}, "max_tokens", 400),
        ("file:// outside the allowed dir", _image_message(outside.as_uri()), image_param, 400),
        ("path escaping the allowed dir", _image_message(str(media_dir / ".." / outside.name)), image_param, 400),
        ("http image without --allow-remote-media", _image_message("http://127.0.0.1:9/cat.png"), image_param, 400),
        (
            "corrupt data-URL image",
            _image_message("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()),
            image_param,
            400,
        ),
        ("image for a text-only model", _image_message((media_dir / "inside.png").as_uri()), image_param, 400),
        ("unknown field", {**ok, "temprature": 0.5}, "temprature", 400),
        ("top_logprobs without logprobs", {**ok, "top_logprobs": 2}, "top_logprobs", 400),
        ("stop of the wrong type", {**ok, "stop": 5}, "stop", 400),
        ("content of the wrong type", {**ok, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", 400),
        ("invalid JSON", '{"model": "tiny", "messages": [', None, 400),
        ("unknown model", {**ok, "model": "gpt-17"}, "model", 404),
    ]


def test_bad_requests_are_400_naming_the_field(server, client, llm, media_dir, tmp_path):
    from PIL import Image

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    for name, body, param, status in _bad_requests(media_dir, outside):
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (name, error)
        assert error["type"] == "invalid_request_error" and error["message"], (name, error)
    # the official client surfaces the field too
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    assert info.value.param == "temperature"
    # and the server still answers, correctly
    expected = offline(llm, temperature=0, max_tokens=8)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.choices[0].message.content == expected.text
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0


def _wait_running(server, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()["vlm_num_requests_running"] < count:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.02)


def test_client_disconnect_aborts_the_request(server):
    # 16 sequences of 400 tokens: far more work than the few moments before the client hangs up
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "n": 16}
    before = server.metrics()
    aborted, completed = 'vlm_requests_total{outcome="aborted"}', 'vlm_requests_total{outcome="completed"}'
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # streaming: read a few chunks, then hang up
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [next(lines) for _ in range(40)]
            assert any(line.startswith("data: {") for line in received)
            _wait_running(server, 16)
    values = server.wait_idle()
    assert values["vlm_num_requests_running"] == 0 and values["vlm_kv_cache_blocks_used"] == 0
    assert values[aborted] == before[aborted] + 1 and values[completed] == before[completed]
    # non-streaming: send the request on a raw socket, hang up once it runs
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        _wait_running(server, 16)
    values = server.wait_idle()
    assert values["vlm_num_requests_running"] == 0 and values["vlm_kv_cache_blocks_used"] == 0
    assert values[aborted] == before[aborted] + 2 and values[completed] == before[completed]
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- AsyncEngine in-process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_engine(tiny_qwen2):
    from vlm.config import EngineConfig
    from vlm.engine.llm_engine import LLMEngine
    from vlm.server.async_engine import AsyncEngine

    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=tiny_qwen2))).start()
    yield engine
    engine.shutdown()


def _wait_engine_idle(async_engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = async_engine.stats
        if (
            stats.num_running == 0
            and stats.num_waiting == 0
            and stats.kv_blocks_used == 0
            and not stats.requests_in_flight
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {async_engine.stats}")


async def _texts(async_engine, prompt, params, n=1) -> list[str]:
    inputs = await async_engine.run_in_pool(async_engine.preprocess, prompt)
    finals = {}
    async for index, output in async_engine.generate(inputs, params, n=n):
        if output.finished:
            finals[index] = output.outputs[0].text
    return [finals[i] for i in range(n)]


def test_async_engine_survives_a_failing_step(async_engine, llm):
    from vlm import SamplingParams
    from vlm.server.async_engine import EngineStepError

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine = async_engine.engine
    real_step = engine.step
    failed = []

    def failing_step():
        # fail once, mid-decode, when all three sequences are in flight
        if not failed and len(engine.scheduler.running) == 3 and engine.scheduler.running[0].output_token_ids:
            failed.append(True)
            raise RuntimeError("injected failure")
        return real_step()

    async def scenario():
        results = await asyncio.gather(
            _texts(async_engine, MESSAGES, params),
            _texts(async_engine, "Hello", params, n=2),
            return_exceptions=True,
        )
        return results

    errors_before = async_engine.stats.step_errors_total
    engine.step = failing_step
    try:
        results = asyncio.run(scenario())
    finally:
        engine.step = real_step
    assert all(isinstance(r, EngineStepError) for r in results), results
    assert "injected failure" in str(results[0])
    _wait_engine_idle(async_engine)
    assert engine.kv_cache.allocator.num_used == 0 and not engine.has_unfinished()
    assert async_engine.stats.step_errors_total == errors_before + 1
    # it keeps serving, with correct results
    expected = offline(llm, temperature=0, max_tokens=16)
    texts = asyncio.run(_texts(async_engine, MESSAGES, SamplingParams(temperature=0, max_tokens=16)))
    assert texts == [expected.text]


def test_async_engine_abort_and_rejection(async_engine):
    from vlm import SamplingParams
    from vlm.errors import InputError

    async def scenario():
        inputs = await async_engine.run_in_pool(async_engine.preprocess, MESSAGES)
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stream = await async_engine.add_request(inputs, params, n=3, request_id="to-abort")
        seen = 0
        async for _index, _output in stream:
            seen += 1
            if seen == 6:
                async_engine.abort("to-abort")
                break
        too_long = await async_engine.run_in_pool(async_engine.preprocess, "x" * 3000)
        with pytest.raises(InputError, match="does not fit the context"):
            await async_engine.add_request(too_long, params)

    asyncio.run(scenario())
    _wait_engine_idle(async_engine)


def test_async_engine_idle_thread_blocks(async_engine):
    """An idle engine thread waits on its inbox instead of spinning."""
    _wait_engine_idle(async_engine)
    steps = async_engine.stats.steps_total
    start = time.process_time()
    time.sleep(0.5)
    assert async_engine.stats.steps_total == steps
    assert time.process_time() - start < 0.2


def test_serve_refuses_a_bad_model_dir(tmp_path, capsys):
    from vlm.cli.main import main

    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 1
    assert "error:" in capsys.readouterr().err


def test_http_answers_when_a_step_fails(async_engine):
    """In-process app: a failed engine step is a 500 (or an SSE error event), and the next request works."""
    from vlm.server.app import ServerSettings, create_app

    app = create_app(async_engine, ServerSettings(served_model_name="tiny"))
    engine = async_engine.engine
    real_step = engine.step
    failed = []

    def failing_step():
        if len(failed) < 2 and engine.scheduler.running and engine.scheduler.running[0].output_token_ids:
            failed.append(True)
            raise RuntimeError("injected failure")
        return real_step()

    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            plain = await http.post("/v1/chat/completions", json=body)
            streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
            engine.step = real_step
            after = await http.post("/v1/chat/completions", json=body)
            return plain, streamed, after

    engine.step = failing_step
    try:
        plain, streamed, after = asyncio.run(scenario())
    finally:
        engine.step = real_step
    assert plain.status_code == 500
    assert plain.json()["error"]["type"] == "server_error" and "injected failure" in plain.json()["error"]["message"]
    assert streamed.status_code == 200
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and "injected failure" in events[-2] and events[-1] == "data: [DONE]"
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
    _wait_engine_idle(async_engine)
