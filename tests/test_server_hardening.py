"""Server framing and access (issue 12): SSE chunks stay one line whatever the text holds, and with
an API key no route but /health answers without it (the OpenAPI schema included)."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

httpx = pytest.importorskip("httpx")

from vlm.server.streaming import sse  # noqa: E402
from vlm.testing.server import ServerProcess  # noqa: E402

LINE_BREAKS = "a\u2028b\u2029c\x85d\ne\rf"


class Chunk(BaseModel):
    text: str


@pytest.mark.parametrize("payload", [Chunk(text=LINE_BREAKS), {"text": LINE_BREAKS}])
def test_sse_events_are_one_line_and_mean_the_same(payload):
    event = sse(payload)
    assert event.endswith("\n\n")
    [line] = event[:-2].splitlines()  # str.splitlines also splits at U+2028, U+2029 and U+0085
    assert json.loads(line[len("data: ") :]) == {"text": LINE_BREAKS}


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen2, tmp_path_factory):
    proc = ServerProcess(tiny_qwen2, "--api-key", "k-123", log_path=tmp_path_factory.mktemp("keyed") / "serve.log")
    yield proc
    proc.stop()


def test_with_an_api_key_only_health_answers_without_it(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/openapi.json", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k-123"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["data"]
