"""A tiny CogVLM2 through ``vlmrun serve`` and the official ``openai`` client.

Chat requests with a picture (of different sizes), text-only ones and a two-turn conversation
about a picture are sent at once, so the engine batches them; each answer must equal the same
request run alone through ``LLM.generate`` (greedy). A second picture in one conversation is a
400 with CogVLM's one-line message, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from vlm.testing.server import ServerProcess  # noqa: E402 (it needs httpx)

MAX_TOKENS = 16


def picture(seed: int, size: tuple[int, int]) -> tuple[str, Image.Image]:
    """A random picture as a PNG data URL (for the API) and as the PIL image that PNG decodes to."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), decoded


def user(text: str, *pictures: tuple[str, Image.Image]) -> tuple[dict, dict]:
    """One user turn as the API takes it and as ``LLM.generate`` takes it."""
    if not pictures:
        return {"role": "user", "content": text}, {"role": "user", "content": text}
    text_part = {"type": "text", "text": text}
    api = [{"type": "image_url", "image_url": {"url": url}} for url, _ in pictures]
    local = [{"type": "image", "image": image} for _, image in pictures]
    return {"role": "user", "content": [*api, text_part]}, {"role": "user", "content": [*local, text_part]}


def conversation(*turns: tuple[dict, dict]) -> tuple[list[dict], list[dict]]:
    return [api for api, _ in turns], [local for _, local in turns]


def conversations() -> list[tuple[list[dict], list[dict]]]:
    wide, tall, square = picture(1, (90, 50)), picture(2, (40, 120)), picture(3, (64, 64))
    answer = {"role": "assistant", "content": "A picture of noise."}
    return [
        conversation(user("Describe the picture.", wide)),
        conversation(user("Hello, how are you today?")),
        conversation(user("What is in it?", tall)),
        conversation(user("Tell me a story about a robot.")),
        conversation(user("Where is the bus? Answer in [[x0,y0,x1,y1]] format.", square)),
        conversation(user("Hi", wide), (answer, answer), user("What colours does it have?")),
    ]


@pytest.fixture(scope="module")
def model(cogvlm_checkpoints) -> str:
    return cogvlm_checkpoints["cogvlm2"]


@pytest.fixture(scope="module")
def alone(model) -> list[tuple[str, int]]:
    """Each conversation's answer (text, completion tokens), each run alone through ``LLM.generate``."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with LLM(model) as llm:
        outputs = [llm.generate([local], params)[0].outputs[0] for _, local in conversations()]
    return [(output.text, len(output.token_ids)) for output in outputs]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    proc = ServerProcess(
        model, "--served-model-name", "tiny", log_path=tmp_path_factory.mktemp("cogvlm-serve") / "serve.log"
    )
    yield proc
    proc.stop()


async def _ask(client, messages) -> tuple[str, int]:
    reply = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].message.content, reply.usage.completion_tokens


def test_concurrent_requests_with_and_without_pictures_answer_as_alone(server, alone):
    assert len(set(alone)) == len(alone), "the answers should differ, or equality proves little"
    peak = {"running": 0.0}

    async def watch(http, done: asyncio.Event):
        """Sample /metrics while the requests run: they must really run together."""
        while not done.is_set():
            for line in (await http.get("/metrics")).text.splitlines():
                if line.startswith("vlm_num_requests_running "):
                    peak["running"] = max(peak["running"], float(line.split()[1]))
            await asyncio.sleep(0.01)

    async def run():
        async with (
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as client,
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        ):
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(http, done))
            try:
                return await asyncio.gather(*(_ask(client, api) for api, _ in conversations()))
            finally:
                done.set()
                await watcher

    assert asyncio.run(run()) == alone, server.log()[-3000:]
    assert peak["running"] >= 2, f"at most {peak['running']:.0f} request ran at a time"
    assert server.wait_idle()["vlm_kv_cache_blocks_used"] == 0


def test_a_second_picture_is_a_400_and_the_server_goes_on(server, alone):
    first, second = picture(4, (30, 30)), picture(5, (50, 20))
    answer = {"role": "assistant", "content": "Noise."}
    two_turns, _ = conversation(user("What is it?", first), (answer, answer), user("And this?", second))
    one_turn, _ = conversation(user("Compare them.", first, second))
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as client:
        for messages in (two_turns, one_turn):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
            message = refused.value.body["message"]
            assert message == (
                "CogVLM takes one picture per conversation (this one has 2); "
                "send each further picture in a conversation of its own"
            )
        # still serving, and correctly
        api, _ = conversations()[0]
        reply = client.chat.completions.create(model="tiny", messages=api, max_tokens=MAX_TOKENS, temperature=0)
        assert (reply.choices[0].message.content, reply.usage.completion_tokens) == alone[0]
    values = server.wait_idle()
    assert values["vlm_kv_cache_blocks_used"] == 0
    assert values['vlm_requests_total{outcome="rejected"}'] == 2
