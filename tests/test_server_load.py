"""Load test of `vlmrun serve` (bounded, loopback only).

64 concurrent streaming chat requests, each with its own picture (a data: URL) on a tiny InternVL
checkpoint, must all complete with exactly the text the offline engine gives for the same
conversation (greedy), with the KV cache empty and the server healthy afterwards. Then 20
malformed requests are mixed into live traffic: each gets a 400 naming the field, and the good
requests around them still match the offline outputs.

Without the InternVL plugin (or its tiny-checkpoint writer) the test runs text-only on the tiny
Qwen2 checkpoint and warns that it did.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import warnings

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from vlm.testing.server import ServerProcess  # noqa: E402

NUM_REQUESTS = 64
MAX_TOKENS = 24
WORDS = ["red", "river", "stone", "cloud", "seven", "window", "garden", "engine"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_qwen2) -> tuple[str, bool]:
    """(model directory, with images?)"""
    try:
        import vlm_plugin_internvl  # noqa: F401
        from vlm_plugin_internvl.testing import write_tiny_internvl
    except ImportError as exc:
        warnings.warn(f"InternVL plugin not available ({exc}); the load test runs text-only", stacklevel=1)
        return tiny_qwen2, False
    return str(write_tiny_internvl(tmp_path_factory.mktemp("internvl") / "tiny-internvl")), True


def _picture(i: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    size = (40 + 8 * (i % 5), 32 + 8 * (i % 3))
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    return "data:image/png;base64," + base64.b64encode(data).decode(), decoded


@pytest.fixture(scope="module")
def conversations(model):
    """(API messages, offline messages) for each request."""
    _, with_images = model
    out = []
    for i in range(NUM_REQUESTS):
        text = f"Request {i}: say something about the {WORDS[i % len(WORDS)]} {WORDS[(i * 3) % len(WORDS)]}."
        if with_images:
            url, image = _picture(i)
            api = [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
                }
            ]
            local = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        else:
            api = local = [{"role": "user", "content": text}]
        out.append((api, local))
    return out


@pytest.fixture(scope="module")
def expected(model, conversations) -> list[str]:
    from vlm import LLM, SamplingParams

    llm = LLM(model[0])
    outputs = llm.chat([local for _, local in conversations], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    texts = [o.outputs[0].text for o in outputs]
    assert len(set(texts)) > NUM_REQUESTS // 2, "the offline outputs should differ between requests"
    return texts


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    proc = ServerProcess(
        model[0], "--served-model-name", "tiny", log_path=tmp_path_factory.mktemp("load-log") / "serve.log"
    )
    yield proc
    proc.stop()


async def _stream_chat(client, messages) -> tuple[str, str | None, int]:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reason, tokens = "", None, -1
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, reason, tokens


def test_64_concurrent_streams(server, conversations, expected, model):
    peak = {"running": 0.0}

    async def watch(http, done: asyncio.Event):
        """Sample /metrics while the requests run: they must really be decoded together."""
        while not done.is_set():
            for line in (await http.get("/metrics")).text.splitlines():
                if line.startswith("vlm_num_requests_running "):
                    peak["running"] = max(peak["running"], float(line.split()[1]))
            await asyncio.sleep(0.02)

    async def run():
        async with (
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as client,
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        ):
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(http, done))
            try:
                return await asyncio.gather(*(_stream_chat(client, api) for api, _ in conversations))
            finally:
                done.set()
                await watcher

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert peak["running"] >= 8, f"at most {peak['running']} sequences ran together"
    assert len(results) == NUM_REQUESTS
    mismatches = [i for i, ((text, _, _), want) in enumerate(zip(results, expected)) if text != want]
    assert not mismatches, f"{len(mismatches)} of {NUM_REQUESTS} differ from the offline engine, e.g. #{mismatches[0]}"
    assert all(reason in ("stop", "length") for _, reason, _ in results)
    assert all(tokens >= 1 for _, _, tokens in results)
    values = server.wait_idle()
    assert values["vlm_kv_cache_blocks_used"] == 0 and values["vlm_num_requests_running"] == 0
    assert values['vlm_requests_total{outcome="completed"}'] == NUM_REQUESTS
    assert values['vlm_requests_total{outcome="aborted"}'] == 0
    assert values["vlm_time_to_first_token_seconds_count"] == NUM_REQUESTS
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    print(
        f"\n{NUM_REQUESTS} streams ({'with images' if model[1] else 'text only'}) in {elapsed:.1f} s, "
        f"up to {peak['running']:.0f} decoded together"
    )


def _malformed(conversations, with_images: bool) -> list[tuple[object, str | None]]:
    ok_messages = conversations[0][0]
    ok = {"model": "tiny", "messages": ok_messages, "max_tokens": MAX_TOKENS}
    corrupt_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()

    def with_image(url: str) -> dict:
        return {
            **ok,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
                }
            ],
        }

    image_param = "messages[0].content[0].image_url"
    cases = [
        ({**ok, "temperature": -1}, "temperature"),
        ({**ok, "top_p": 2}, "top_p"),
        ({**ok, "messages": []}, "messages"),
        ({**ok, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "messages": [{"role": "user", "content": "y" * 3000}]}, "messages"),
        (with_image(corrupt_png), image_param),
        (with_image("file:///etc/hostname"), image_param),
        (with_image("https://127.0.0.1:9/x.png"), image_param),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "unterminated', None),
        ({**ok, "n": 0}, "n"),
        ({**ok, "stop": [""]}, "stop"),
        ({**ok, "top_k": -5}, "top_k"),
        ({**ok, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        (
            # a video file on a server that reads no local files
            {**ok, "messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
            "messages[0].content[0].video",
        ),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({**ok, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**ok, "repetition_penalty": 0}, "repetition_penalty"),
        ({**ok, "presence_penalty": 2.5}, "presence_penalty"),
        ({**ok, "min_p": 1.5}, "min_p"),
    ]
    assert len(cases) == 20
    return cases


def test_malformed_requests_mixed_into_live_traffic(server, conversations, expected, model):
    before = server.metrics()
    bad = _malformed(conversations, model[1])
    good = list(range(20))

    async def send_bad(http, body):
        await asyncio.sleep(0.01)
        if isinstance(body, str):
            return await http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        return await http.post("/v1/chat/completions", json=body)

    async def run():
        async with (
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as client,
            httpx.AsyncClient(base_url=server.url, timeout=120) as http,
        ):
            tasks = []
            for i in good:  # good and bad requests interleaved
                tasks.append(_stream_chat(client, conversations[i][0]))
                tasks.append(send_bad(http, bad[i][0]))
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    good_results, bad_results = results[0::2], results[1::2]
    for (body, param), response in zip(bad, bad_results):
        assert response.status_code == 400, (body if isinstance(body, str) else list(body), response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert [text for text, _, _ in good_results] == [expected[i] for i in good]
    values = server.wait_idle()
    assert values["vlm_kv_cache_blocks_used"] == 0 and values["vlm_num_requests_running"] == 0
    rejected = 'vlm_requests_total{outcome="rejected"}'
    completed = 'vlm_requests_total{outcome="completed"}'
    assert values[rejected] - before[rejected] == 20
    assert values[completed] - before[completed] == 20
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
