"""Hostile clients cannot starve others (issue 12, part 4).

- A remote image has a deadline for its whole download (not per read) and a size cap: a server
  that sends a byte at a time, or too many bytes, is a 400 naming the limit and its flag.
- Pixels are counted from the images' headers before anything is decoded: a request over
  ``--max-request-pixels`` is a 400; ``--max-inflight-pixels`` makes the others wait their turn
  (:class:`vlm.server.prompts.PixelBudget`).
- A text request is answered while 8 hostile image requests (4 slow-drip downloads, 4 small PNGs
  that decode to 62 MP each) are in progress, well before they end: text prompts never queue
  behind image work.

Timing assertions are bounds with wide margins, never tight figures: the machine may be busy.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from vlm.errors import InputError  # noqa: E402
from vlm.inputs.images import ImageLimitError, check_pixel_budget, load_image, open_image  # noqa: E402
from vlm.testing.server import ServerProcess  # noqa: E402

DRIP_INTERVAL_S = 0.5
REMOTE_TIMEOUT_S = 10  # the server's --remote-media-timeout below (the default)
NUM_DRIP = 4
NUM_BIG = 4
BIG_SIDE = 7900  # 62.4 MP: under the default --max-request-pixels (64M), so it is decoded


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels: only a header-first check refuses
    it for its size (decoding it would fail as truncated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 120, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


class Remote(http.server.BaseHTTPRequestHandler):
    """``/drip/*``: 200 with a big Content-Length, then one byte every DRIP_INTERVAL_S (for minutes);
    ``/stall``: never answers; ``/big``: declares 1 MiB; ``/chunked``: 1 MiB without a length;
    ``/ok.png``: a small picture."""

    drips = 0
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        try:
            if self.path.startswith("/drip"):
                with Remote.lock:
                    Remote.drips += 1
                self._head({"Content-Length": "50000"})  # under the cap: only the deadline stops it
                for _ in range(int(300 / DRIP_INTERVAL_S)):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(DRIP_INTERVAL_S)
            elif self.path == "/stall":
                time.sleep(300)
            elif self.path == "/big":
                self._head({"Content-Length": str(2**20)})
                self.wfile.write(b"\0" * 2**20)
            elif self.path == "/chunked":
                self._head({"Transfer-Encoding": "chunked"})
                for _ in range(16):
                    piece = b"\0" * 65536
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif self.path == "/ok.png":
                payload = small_png()
                self._head({"Content-Length": str(len(payload))})
                self.wfile.write(payload)
            else:
                self.send_error(404)
        except OSError:  # the client gave up on us: that is the point
            pass

    def _head(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def remote():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- vlm.inputs.images: the fetch's deadline and size cap, pixels before decoding ---------------------


def test_a_slow_drip_download_ends_at_the_deadline(remote):
    start = time.monotonic()
    with pytest.raises(ImageLimitError) as exc:
        load_image(f"{remote}/drip/a.png", allow_remote=True, remote_timeout=1.5)
    elapsed = time.monotonic() - start
    assert exc.value.limit == "remote_timeout"
    message = str(exc.value)
    assert "\n" not in message and "took longer than 1.5 s" in message and "data: URL" in message
    # the drip would last minutes, and each byte comes well within any per-read timeout
    assert 1.0 < elapsed < 30, elapsed


def test_a_server_that_never_answers_ends_at_the_deadline(remote):
    start = time.monotonic()
    with pytest.raises(ImageLimitError) as exc:
        load_image(f"{remote}/stall", allow_remote=True, remote_timeout=1.0)
    assert exc.value.limit == "remote_timeout"
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("path", ["/big", "/chunked"])
def test_a_remote_image_over_the_size_cap(remote, path):
    with pytest.raises(ImageLimitError) as exc:
        load_image(f"{remote}{path}", allow_remote=True, max_remote_bytes=100_000)
    assert exc.value.limit == "remote_bytes"
    assert "larger than 100,000 bytes" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ImageLimitError, match="larger than 64 KiB"):
        load_image(f"{remote}{path}", allow_remote=True, max_remote_bytes=65536)


def test_a_good_remote_image_still_loads(remote):
    assert load_image(f"{remote}/ok.png", allow_remote=True, remote_timeout=30).size == (40, 30)


def test_pixels_are_counted_from_headers_before_decoding():
    # header-only files: decoding them would fail ("truncated"); the size check comes first
    with pytest.raises(ImageLimitError) as exc:
        open_image(png_header_only(9000, 9000))
    assert exc.value.limit == "pixels" and "81,000,000 pixels" in str(exc.value)
    opened = [open_image(png_header_only(7000, 7000)) for _ in range(2)]
    assert [image.size for image in opened] == [(7000, 7000), (7000, 7000)]
    with pytest.raises(ImageLimitError) as exc:
        check_pixel_budget(opened, 64_000_000)
    assert exc.value.limit == "request_pixels"
    assert "98,000,000 pixels in all (7000x7000 + 7000x7000)" in str(exc.value)
    assert check_pixel_budget(opened[:1], 64_000_000) == 49_000_000
    with pytest.raises(InputError, match="truncated"):
        opened[0].decode()


# -- the server-wide pixel budget ---------------------------------------------------------------


def test_pixel_budget_waits_in_order_times_out_and_closes():
    from vlm.server.async_engine import EngineStoppedError
    from vlm.server.errors import RequestError
    from vlm.server.prompts import PixelBudget

    async def scenario():
        budget = PixelBudget(100, wait_timeout=30)
        await budget.acquire(60)
        order = []

        async def take(pixels, name):
            await budget.acquire(pixels)
            order.append(name)

        big = asyncio.ensure_future(take(80, "big"))
        small = asyncio.ensure_future(take(10, "small"))  # fits now, but waits behind "big": no starvation
        await asyncio.sleep(0)
        assert order == [] and budget.in_use == 60
        budget.release(60)
        await asyncio.wait_for(asyncio.gather(big, small), 30)
        assert order == ["big", "small"] and budget.in_use == 90

        # a waiter that times out is a 503 naming the flag, and gives its place to the next
        impatient = PixelBudget(100, wait_timeout=0.05)
        await impatient.acquire(100)
        with pytest.raises(RequestError) as exc:
            await impatient.acquire(1)
        assert exc.value.status == 503 and "--max-inflight-pixels" in exc.value.message
        assert impatient.in_use == 100 and not impatient._waiters

        # a cancelled waiter leaves no trace
        waiting = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        budget.release(90)
        assert budget.in_use == 0

        # closing wakes the waiters with the engine's "stopped" error (a 503) and refuses new ones
        await budget.acquire(100)
        stuck = asyncio.ensure_future(budget.acquire(1))
        await asyncio.sleep(0)
        budget.close()
        with pytest.raises(EngineStoppedError):
            await stuck
        with pytest.raises(EngineStoppedError):
            await budget.acquire(1)

    asyncio.run(scenario())


def test_media_limits_are_checked_and_cli_defaults_agree():
    from vlm.cli import serve
    from vlm.server.prompts import MediaLimits

    defaults = MediaLimits()
    assert (
        defaults.remote_timeout,
        defaults.remote_max_bytes,
        defaults.max_request_pixels,
        defaults.max_inflight_pixels,
    ) == (
        serve.REMOTE_MEDIA_TIMEOUT_S,
        serve.REMOTE_MEDIA_MAX_BYTES,
        serve.MAX_REQUEST_PIXELS,
        serve.MAX_INFLIGHT_PIXELS,
    )
    with pytest.raises(InputError, match="--max-inflight-pixels"):
        MediaLimits(max_request_pixels=10, max_inflight_pixels=5).check()
    with pytest.raises(InputError, match="--remote-media-timeout"):
        MediaLimits(remote_timeout=0).check()


def test_serve_flags(capsys):
    from vlm.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--remote-media-timeout", "default: 10"),
        ("--remote-media-max-bytes", "default: 32MiB"),
        ("--max-request-pixels", "default: 64M"),
        ("--max-inflight-pixels", "default: 128M"),
        ("--shutdown-timeout", "default: 5"),
    ]:
        assert flag in text and default in text[text.index(flag) :], flag
    # bad settings are one-line errors before any model is loaded
    assert main(["serve", "--model", "/nonexistent", "--max-request-pixels", "2M", "--max-inflight-pixels", "1M"]) == 1
    err = capsys.readouterr().err
    assert "--max-inflight-pixels" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--model", "/nonexistent", "--remote-media-max-bytes", "lots"])
    assert "not a number" in capsys.readouterr().err


def test_text_only_models_refuse_images_before_fetching_them(remote):
    from vlm.server.errors import RequestError
    from vlm.server.prompts import PromptBuilder
    from vlm.server.protocol import ChatMessage

    class TextEngine:
        is_multimodal = False

    builder = PromptBuilder(TextEngine(), "m", None, allow_remote_media=True)  # type: ignore[arg-type]
    before = Remote.drips
    message = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{remote}/drip/x.png"}}]}
    )
    with pytest.raises(RequestError, match="text-only model") as exc:
        builder.image_parts([message])
    assert exc.value.param == "messages[0].content[0].image_url"
    assert Remote.drips == before


# -- through `vlmrun serve` ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_model(tmp_path_factory) -> str:
    testing = pytest.importorskip("vlm_plugin_internvl.testing")
    return str(testing.write_tiny_internvl(tmp_path_factory.mktemp("internvl") / "tiny-internvl"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("hostile-media")
    first = root / "big0.png"
    Image.new("RGB", (BIG_SIDE, BIG_SIDE), (200, 30, 30)).save(first, compress_level=1)
    for i in range(1, NUM_BIG):
        (root / f"big{i}.png").write_bytes(first.read_bytes())
    (root / "wide.png").write_bytes(png_header_only(7000, 7000))
    (root / "wide2.png").write_bytes(png_header_only(7000, 7000))
    (root / "bomb.png").write_bytes(png_header_only(30000, 30000))
    return root


@pytest.fixture(scope="module")
def server(vlm_model, media_dir, tmp_path_factory):
    proc = ServerProcess(
        vlm_model,
        "--served-model-name",
        "m",
        "--allow-remote-media",
        "--allowed-media-dir",
        str(media_dir),
        "--remote-media-timeout",
        str(REMOTE_TIMEOUT_S),
        "--remote-media-max-bytes",
        "64KiB",
        log_path=tmp_path_factory.mktemp("hostile-log") / "serve.log",
    )
    yield proc
    proc.stop()


def chat(url: str, content, max_tokens: int = 8) -> tuple[float, httpx.Response]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    start = time.monotonic()
    response = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=600)
    return time.monotonic() - start, response


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_limits_through_the_server_name_the_flag(server, remote, media_dir):
    cases = [
        ([image_part(f"{remote}/big")], "messages[0].content[0].image_url", "--remote-media-max-bytes"),
        ([image_part(str(media_dir / "bomb.png"))], "messages[0].content[0].image_url", "too many pixels"),
        ([image_part(str(media_dir / "wide.png"))], None, None),  # 49 MP alone: decoded, then truncated
        # a request's images are read together: the bomb is refused without waiting for the drip before it
        (
            [image_part(f"{remote}/drip/slow.png"), image_part(str(media_dir / "bomb.png"))],
            "messages[0].content[1].image_url",
            "too many pixels",
        ),
        (
            [image_part(str(media_dir / "wide.png")), image_part(str(media_dir / "wide2.png"))],
            "messages",
            "--max-request-pixels",
        ),
    ]
    for content, param, needle in cases:
        _, response = chat(server.url, [*content, {"type": "text", "text": "What is it?"}])
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "\n" not in error["message"]
        if needle is None:
            assert "truncated" in error["message"]
        else:
            assert needle in error["message"] and error["param"] == param, error
    _, ok = chat(server.url, [image_part(f"{remote}/ok.png"), {"type": "text", "text": "What is it?"}])
    assert ok.status_code == 200, ok.text
    # the pixels of the requests refused after taking their share (the truncated one) were given back
    assert server.metrics()["vlm_image_pixels_in_flight"] == 0


def test_text_requests_are_answered_while_hostile_image_requests_run(server, remote, media_dir):
    # warm up: the first request of a server pays for lazy initialisation
    assert chat(server.url, "Warm up.")[1].status_code == 200
    hostile = [
        [image_part(f"{remote}/drip/{i}.png"), {"type": "text", "text": "Describe it."}] for i in range(NUM_DRIP)
    ]
    hostile += [
        [image_part(str(media_dir / f"big{i}.png")), {"type": "text", "text": "Describe it."}] for i in range(NUM_BIG)
    ]
    drips_before = Remote.drips
    peak = {"vlm_image_pixels_in_flight": 0.0, "vlm_image_requests_waiting": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            values = server.metrics()
            for name in peak:
                peak[name] = max(peak[name], values[name])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(len(hostile)) as pool:
        start = time.monotonic()
        futures = [pool.submit(chat, server.url, content) for content in hostile]
        # the downloads have begun: the hostile requests are in the server
        deadline = time.monotonic() + 120
        while Remote.drips < drips_before + NUM_DRIP and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Remote.drips >= drips_before + NUM_DRIP, "the server never fetched the remote images"
        text_latency, text = chat(server.url, "Say hello.")
        results = [future.result() for future in futures]
        hostile_duration = time.monotonic() - start
    done.set()
    watcher.join(30)
    print(
        f"\ntext request: {text_latency:.2f} s while {len(hostile)} hostile image requests ran "
        f"for {hostile_duration:.2f} s; at most {peak['vlm_image_pixels_in_flight']:,.0f} pixels in flight, "
        f"{peak['vlm_image_requests_waiting']:.0f} requests waiting for them"
    )
    assert text.status_code == 200, text.text
    for _, response in results[:NUM_DRIP]:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert f"took longer than {REMOTE_TIMEOUT_S} s" in error["message"]
        assert "--remote-media-timeout" in error["message"] and "\n" not in error["message"]
    for _, response in results[NUM_DRIP:]:
        assert response.status_code == 200, response.text  # big but within the limits: served in turn
    # the drips alone hold their requests for the whole deadline; the text answer came well before
    assert hostile_duration >= REMOTE_TIMEOUT_S * 0.9
    assert text_latency < 0.5 * hostile_duration, (text_latency, hostile_duration)
    # and the server is still healthy and idle
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    idle = server.wait_idle(60)
    assert idle["vlm_num_requests_running"] == 0 and idle["vlm_kv_cache_blocks_used"] == 0
    # the big pictures took turns: never more pixels in flight than the default 128M, none left over
    assert 0 < peak["vlm_image_pixels_in_flight"] <= 128_000_000
    assert idle["vlm_image_pixels_in_flight"] == 0 and idle["vlm_image_requests_waiting"] == 0
