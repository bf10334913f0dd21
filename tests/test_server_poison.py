"""Through `vlmrun serve`: the poison requests of issue 12 next to 4 concurrent good requests.

Each poison gets its own answer (a 400 naming the field, or for a vanishing temperature a
greedy answer), and the 4 good requests, sent at the same time, get exactly the tokens the
offline engine gives them alone. The server keeps serving afterwards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")

from vlm.testing.server import ServerProcess  # noqa: E402

GOOD = [f"Tell me about the number {i}." for i in range(4)]
#: body fields -> the status it must get and what its error must name
POISON = [
    ({"temperature": 1e-45}, 200, None),
    ({"temperature": 1.0, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"stop_token_ids": [-1000], "min_tokens": 3}, 400, "stop_token_ids"),
    ({"seed": 2**70}, 400, "seed"),
]


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    proc = ServerProcess(
        tiny_qwen2, "--served-model-name", "m", log_path=tmp_path_factory.mktemp("poison-log") / "serve.log"
    )
    yield proc
    proc.stop()


def _chat(url: str, content: str, **extra):
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_poison_requests_get_their_own_answer_and_neighbours_are_untouched(server, tiny_qwen2):
    from vlm import LLM, SamplingParams

    llm = LLM(tiny_qwen2)
    params = SamplingParams(temperature=0, max_tokens=12)
    alone = [llm.chat([{"role": "user", "content": text}], params)[0].outputs[0].text for text in GOOD]
    with ThreadPoolExecutor(len(GOOD) + len(POISON)) as pool:
        good = [pool.submit(_chat, server.url, text, temperature=0) for text in GOOD]
        bad = [pool.submit(_chat, server.url, "Poison!", **fields) for fields, _, _ in POISON]
        good_answers = [f.result() for f in good]
        bad_answers = [f.result() for f in bad]
    for response, expected in zip(good_answers, alone):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
    for response, (fields, status, field) in zip(bad_answers, POISON):
        assert response.status_code == status, (fields, response.text)
        if field is not None:
            error = response.json()["error"]
            assert field in error["message"] and "\n" not in error["message"], error
    # still serving
    assert _chat(server.url, GOOD[0], temperature=0).json()["choices"][0]["message"]["content"] == alone[0]
