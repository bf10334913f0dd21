"""The hostile-request corpus (``tests/corpus/server_requests.jsonl``) against a real ``vlmrun serve``.

Each case is one HTTP request with the status it must get and what its error must name (in the
OpenAI-style error's message or ``param``); every error message is one line, and no case may get a
5xx. After each case the next good request is answered exactly as before the corpus started, and
``/metrics`` shows the engine idle (nothing running or waiting, no KV block held). At the end the
server's log holds no traceback and nothing was unpickled.

Placeholders in a case: ``$MEDIA`` (the allowed media directory, filled by
``tests/corpus/media.py``), ``$DATAURL:<file>`` (that file as a data: URL), ``$IMAGE_TOKEN_ID``
(the model's image placeholder token id).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")

from vlm.testing.server import ServerProcess  # noqa: E402

CORPUS = Path(__file__).parent / "corpus"
CASES = [json.loads(line) for line in (CORPUS / "server_requests.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> str:
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("corpus-model") / "qwen2-vl", "qwen2_vl", seed=0))


@pytest.fixture(scope="module")
def server(qwen2_vl, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("corpus-log") / "serve.log"
    proc = ServerProcess(
        qwen2_vl, "--served-model-name", "m", "--allowed-media-dir", str(media), "--max-model-len", "1024", log_path=log
    )
    yield proc
    proc.stop()
    assert "Traceback" not in log.read_text(errors="replace"), proc.log()
    assert not (media / "PWNED").exists(), "a corpus file was unpickled"


def _good_body(media: Path) -> dict:
    content = [{"type": "image_url", "image_url": {"url": str(media / "red.png")}}, {"type": "text", "text": "What?"}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def good_answer(server, media) -> str:
    response = httpx.post(f"{server.url}/v1/chat/completions", json=_good_body(media), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _substitute(value: Any, media: Path, image_token_id: int) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, media, image_token_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, media, image_token_id) for v in value]
    if isinstance(value, str):
        if value == "$IMAGE_TOKEN_ID":
            return image_token_id
        if value.startswith("$DATAURL:"):
            data = (media / value.removeprefix("$DATAURL:")).read_bytes()
            return "data:image/png;base64," + base64.b64encode(data).decode()
        return value.replace("$MEDIA", str(media))
    return value


def _send(server: ServerProcess, case: dict, media: Path, image_token_id: int) -> httpx.Response:
    url = server.url + case["endpoint"]
    method = case.get("method", "POST")
    headers = case.get("headers", {})
    if "raw_hex" in case:
        content: bytes | None = bytes.fromhex(case["raw_hex"])
    elif "raw" in case:
        content = case["raw"].encode()
    elif "body" in case:
        content = json.dumps(_substitute(case["body"], media, image_token_id)).encode()
    else:
        content = None
    if content is not None and "content-type" not in {k.lower() for k in headers}:
        headers = {**headers, "content-type": "application/json"}
    return httpx.request(method, url, content=content, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def image_token_id(qwen2_vl) -> int:
    return int(json.loads((Path(qwen2_vl) / "config.json").read_text())["image_token_id"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_server_case(case, server, media, good_answer, image_token_id):
    response = _send(server, case, media, image_token_id)
    assert response.status_code == case["status"], (case["id"], response.status_code, response.text[:500])
    if response.status_code >= 400 and case["endpoint"].startswith("/v1/"):
        error = response.json()["error"]
        message, param = error["message"], error.get("param") or ""
        assert message and "\n" not in message, error
        for needle in case["mentions"]:
            assert needle in message or needle in param, (case["id"], needle, error)
    after = httpx.post(f"{server.url}/v1/chat/completions", json=_good_body(media), timeout=120)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == good_answer
    idle = server.wait_idle()
    assert idle["vlm_num_requests_running"] == 0 and idle["vlm_kv_cache_blocks_used"] == 0, idle


def test_the_corpus_is_large_and_well_formed():
    families = {c["family"] for c in CASES}
    assert len(CASES) >= 150 and len({c["id"] for c in CASES}) == len(CASES)
    assert {"http-body", "messages", "sampling", "prompts", "media", "routes"} <= families
    for case in CASES:
        assert set(case) <= {
            "id",
            "family",
            "endpoint",
            "status",
            "mentions",
            "method",
            "body",
            "raw",
            "raw_hex",
            "headers",
        }
