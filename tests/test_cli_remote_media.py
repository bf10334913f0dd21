"""``vlmrun --allow-remote-media``: a picture given as an http(s) URL is fetched only with the flag;
without it, a one-line error says how to allow it (before the model loads, for ``--image``). The
pictures come from an ``http.server`` on 127.0.0.1 (no internet); the model is a stand-in that
remembers what it was sent."""

from __future__ import annotations

import http.server
import io
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlm.cli.main import main

PICTURE = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)  # 40 x 30


@pytest.fixture(scope="module")
def server():
    """``http://127.0.0.1:PORT``, serving ``/pic.png``; ``server.hits`` counts its requests."""
    buffer = io.BytesIO()
    Image.fromarray(PICTURE).save(buffer, format="PNG")
    payload = buffer.getvalue()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path != "/pic.png":
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", hits=hits)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sent(monkeypatch):
    """The prompts the stand-in model received (``None`` until vlmrun loads it)."""
    import vlm.llm

    record = SimpleNamespace(prompts=None)

    class FakeLLM:
        def __init__(self, model, **kwargs):
            record.prompts = []
            self.tokenizer = SimpleNamespace(chat_template="x")
            self.engine = SimpleNamespace(default_sampling_values=dict, preprocessor=None)

        def stream(self, prompt, params):
            record.prompts.append(prompt)
            yield "ok"

    monkeypatch.setattr(vlm.llm, "LLM", FakeLLM)
    return record


def images_sent(prompt) -> list:
    content = prompt[-1]["content"]  # a text-only turn's content is a string
    return [part["image"] for part in content if part["type"] == "image"] if isinstance(content, list) else []


def test_an_image_url_is_refused_without_the_flag(server, sent, tmp_path, capsys):
    url = f"{server.url}/pic.png"
    before = len(server.hits)
    assert main(["--model", str(tmp_path), "--image", url, "--prompt", "what is it?"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: image {url!r}: remote image URLs are not fetched unless you pass --allow-remote-media; "
        "pass it, or download the picture and give its path\n"
    )
    assert sent.prompts is None, "refused before the model loads"
    assert len(server.hits) == before, "nothing was fetched"


def test_an_image_url_is_fetched_with_the_flag(server, sent, tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--image", f"{server.url}/pic.png", "--prompt", "what is it?"]
    assert main([*argv, "--allow-remote-media"]) == 0
    assert capsys.readouterr().out == "ok\n"
    (picture,) = images_sent(sent.prompts[0])
    assert np.array_equal(np.asarray(picture), PICTURE)
    # a URL the server does not have: one line naming the HTTP error
    argv[3] = f"{server.url}/missing.png"
    assert main([*argv, "--allow-remote-media"]) == 1
    assert "error: image" in (err := capsys.readouterr().err) and "HTTP 404" in err and len(err.splitlines()) == 1


def test_chat_image_urls_follow_the_flag(server, sent, tmp_path, monkeypatch, capsys):
    url = f"{server.url}/pic.png"
    before = len(server.hits)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {url}\nfirst\n"))
    assert main(["--model", str(tmp_path)]) == 0
    assert len(server.hits) == before, "nothing was fetched"
    err = capsys.readouterr().err
    assert f"error: image {url!r}: remote image URLs are not fetched unless you pass --allow-remote-media" in err
    assert sent.prompts[0][-1] == {"role": "user", "content": "first"}, "the chat went on without the picture"

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {url}\nsecond\n"))
    assert main(["--model", str(tmp_path), "--allow-remote-media"]) == 0
    assert f"(attached {url}; it goes with your next message)" in capsys.readouterr().err
    (picture,) = images_sent(sent.prompts[0])
    assert np.array_equal(np.asarray(picture), PICTURE)
