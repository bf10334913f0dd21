"""Run ``vlmrun serve`` as a subprocess in tests: 127.0.0.1, an OS-picked port, stopped on exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    """`vlmrun serve` as a subprocess on 127.0.0.1 with an OS-picked port; stops itself on exit."""

    def __init__(self, model: str, *args: str, log_path: Path, startup_timeout: float = 90.0):
        script = Path(sys.executable).with_name("vlmrun")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "vlm.cli.main"]
        command += ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--no-access-log", *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.url = self._wait_for_url(startup_timeout)
        self._wait_for_health(startup_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        lines: list[str] = []
        stdout = self.proc.stdout
        assert stdout is not None  # started with stdout=PIPE
        reader = threading.Thread(target=lambda: lines.append(stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout)
        match = re.search(r"http://127\.0\.0\.1:\d+", lines[0]) if lines else None
        if match is None:
            self.stop()
            raise RuntimeError(f"server did not start; its log:\n{self.log()}")
        return match.group(0)

    def _wait_for_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server never became healthy; its log:\n{self.log()}")

    def log(self) -> str:
        """The end of the server's log (also once it has stopped)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until nothing runs and no KV block is held."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            idle = (
                values["vlm_num_requests_running"] == 0
                and values["vlm_num_requests_waiting"] == 0
                and values["vlm_kv_cache_blocks_used"] == 0
            )
            if idle or time.monotonic() > deadline:
                return values
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
