"""`vlmrun serve` stops gracefully on SIGTERM / SIGINT (issue 12, part 4).

No new connections; running requests get ``--shutdown-timeout`` seconds to finish; then the
engine's shutdown runs, the streams still going end with an error event and ``data: [DONE]``,
and the process exits with status 0 (uvicorn alone re-raised the signal: status -15, the engine
thread never told, streams cut without a last event).

Every wait polls with a generous deadline: the machine may be busy.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from vlm.testing.server import ServerProcess  # noqa: E402

EXIT_TIMEOUT_S = 90


def start_stream(url: str, max_tokens: int) -> tuple[list[str], threading.Event, threading.Event, threading.Thread]:
    """Stream a long chat answer in a thread: (events so far, first content seen, stream ended, thread)."""
    events: list[str] = []
    started, ended = threading.Event(), threading.Event()
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }

    def read() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        if '"content":"' in line and '"content":""' not in line:
                            started.set()
        except httpx.HTTPError as exc:  # the connection was cut: recorded for the assertion
            events.append(f"<{type(exc).__name__}: {exc}>")
        finally:
            started.set()
            ended.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return events, started, ended, thread


def wait_for_exit(server: ServerProcess) -> int:
    try:
        return server.proc.wait(EXIT_TIMEOUT_S)
    except Exception:
        pytest.fail(f"the server did not exit within {EXIT_TIMEOUT_S} s; its log:\n{server.log()}")


def refuses_connections(url: str) -> bool:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=5)
        except httpx.HTTPError:
            return True
        time.sleep(0.05)
    return False


def start_whole(url: str, max_tokens: int) -> tuple[list[httpx.Response], threading.Thread]:
    """A long non-streamed chat request in a thread: (its response, once it came; thread)."""
    responses: list[httpx.Response] = []
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    thread = threading.Thread(
        target=lambda: responses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)),
        daemon=True,
    )
    thread.start()
    return responses, thread


def wait_running(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 120
    while server.metrics()["vlm_num_requests_running"] < count:
        assert time.monotonic() < deadline, f"never {count} requests running; the log:\n{server.log()}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_running_requests_cleanly_and_exits_0(tiny_qwen2, tmp_path, sig):
    server = ServerProcess(
        tiny_qwen2, "--served-model-name", "m", "--shutdown-timeout", "0", log_path=tmp_path / "serve.log"
    )
    try:
        whole, whole_thread = start_whole(server.url, max_tokens=400)
        events, started, ended, thread = start_stream(server.url, max_tokens=400)
        assert started.wait(120), server.log()
        wait_running(server, 2)
        server.proc.send_signal(sig)
        assert refuses_connections(server.url), "the server still accepts connections after the signal"
        assert ended.wait(EXIT_TIMEOUT_S), f"the stream did not end; the log:\n{server.log()}"
        assert wait_for_exit(server) == 0, server.log()
        thread.join(10)
        whole_thread.join(10)
    finally:
        server.stop()
    assert events and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:  # ended by the shutdown (the usual case: 0 s to finish)
        assert last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]
    else:  # it finished first
        assert last["choices"][0]["finish_reason"] == "length"
    [response] = whole
    if response.status_code == 503:
        error = response.json()["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]
    else:
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
    log = server.log()
    assert "shutting down" in log and "engine stopped" in log, log


def test_requests_that_finish_within_the_shutdown_timeout_complete(tiny_qwen2, tmp_path):
    server = ServerProcess(
        tiny_qwen2, "--served-model-name", "m", "--shutdown-timeout", "120", log_path=tmp_path / "serve.log"
    )
    try:
        events, started, ended, thread = start_stream(server.url, max_tokens=40)
        assert started.wait(120), server.log()
        server.proc.send_signal(signal.SIGTERM)
        assert ended.wait(EXIT_TIMEOUT_S), f"the stream did not end; the log:\n{server.log()}"
        assert wait_for_exit(server) == 0, server.log()
        thread.join(10)
    finally:
        server.stop()
    assert events[-1] == "[DONE]", events[-3:]
    finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if '"choices":[{' in e]
    assert finishes[-1] == "length", events[-3:]
    assert not any('"error"' in e for e in events)
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if '"delta"' in e)
    assert text, "the story is empty"
    assert "engine stopped" in server.log()
