"""Every first-party VLM family through `vlmrun serve` and the official `openai` client.

Each server gets concurrent requests with pictures of different sizes (one with two pictures, one
without), so they are batched together by the engine; every answer must equal the offline
engine's for the same conversation (greedy).
"""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

openai = pytest.importorskip("openai")

from vlm.testing.server import ServerProcess  # noqa: E402

MAX_TOKENS = 16
SIZES = [(40, 120), (90, 50), (64, 64), (17, 300), (200, 30)]


def _writers():
    writers = {}
    try:
        from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

        writers["qwen2_vl"] = lambda path: write_tiny_qwen2_vl(path, "qwen2_vl", seed=2)
        writers["qwen2_5_vl"] = lambda path: write_tiny_qwen2_vl(path, "qwen2_5_vl", seed=2)
    except ImportError:
        pass
    try:
        from vlm_plugin_llava.testing import write_tiny_llava

        writers["llava"] = lambda path: write_tiny_llava(path, "llava-clip-llama", seed=2)
        writers["llava_next"] = lambda path: write_tiny_llava(path, "llava-next-clip-mistral", seed=2)
    except ImportError:
        pass
    return writers


WRITERS = _writers()


def _picture(seed: int, size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), decoded


def conversations():
    """(API messages, offline messages) pairs: one picture each, two pictures, none."""
    out = []
    pictures = [_picture(i, size) for i, size in enumerate(SIZES)]
    groups = [[p] for p in pictures] + [[pictures[0], pictures[3]], []]
    for i, group in enumerate(groups):
        text = f"Request {i}: what do you see?"
        api = [{"type": "image_url", "image_url": {"url": url}} for url, _ in group]
        local = [{"type": "image", "image": image} for _, image in group]
        text_part = {"type": "text", "text": text}
        out.append(
            ([{"role": "user", "content": [*api, text_part]}], [{"role": "user", "content": [*local, text_part]}])
        )
    return out


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_served_answers_equal_offline_with_mixed_image_sizes(family, tmp_path):
    from vlm import LLM, SamplingParams

    model = str(WRITERS[family](tmp_path / family))
    chats = conversations()
    offline = LLM(model).chat([local for _, local in chats], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    expected = [o.outputs[0].text for o in offline]
    assert len(set(expected)) > len(expected) // 2, "the offline answers should differ"

    server = ServerProcess(model, "--served-model-name", "tiny", log_path=tmp_path / "serve.log")
    try:

        async def ask_all():
            async with openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120
            ) as client:

                async def ask(messages):
                    reply = await client.chat.completions.create(
                        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0
                    )
                    return reply.choices[0].message.content

                return await asyncio.gather(*(ask(api) for api, _ in chats))

        assert asyncio.run(ask_all()) == expected, server.log()[-3000:]
    finally:
        server.stop()
