"""``vlmrun serve --model DIR``: an OpenAI-compatible HTTP server (127.0.0.1:8000 by default).

Logs go to stderr; once the server listens, one line with its URL goes to stdout.

    vlmrun serve --model ./InternVL2_5-1B
    curl localhost:8000/v1/models

SIGTERM or SIGINT (Ctrl-C) stops it gracefully: no new connections; running requests get
``--shutdown-timeout`` seconds to finish; then the engine shuts down, so those still running end
cleanly (a stream with an error event and ``data: [DONE]``, a whole response with a 503), and the
process exits with status 0. A second signal skips the wait; a third stops waiting for connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlm.cli.engine_args import add_engine_arguments, engine_settings

logger = logging.getLogger("vlm.server")

# the defaults of the media limits (vlm.server.prompts.MediaLimits; kept here so --help imports no server)
REMOTE_MEDIA_TIMEOUT_S = 10.0
REMOTE_MEDIA_MAX_BYTES = 32 * 2**20
MAX_REQUEST_PIXELS = 64_000_000
MAX_INFLIGHT_PIXELS = 128_000_000
SHUTDOWN_TIMEOUT_S = 5.0
#: seconds uvicorn waits for connections after the engine stopped, before it cuts them
_CONNECTION_GRACE_S = 15.0


def _amount(binary: bool) -> Callable[[str], int]:
    """An argparse type: ``123``, ``64_000_000``, ``64M``, ``32MiB``, ``1.5G`` (K/M/G: 1000s, or 1024s when ``binary``)."""

    def parse(text: str) -> int:
        match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgG]?)(i?[bB]?)\s*", text)
        if match is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 64000000, 64M or 32MiB)")
        number, prefix, suffix = match.groups()
        base = 1024 if (binary or suffix.lower().startswith("i")) else 1000
        value = float(number.replace("_", "")) * base ** " kmg".index(prefix.lower() or " ")
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
        return int(value)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    server.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    server.add_argument("--served-model-name", help="the model's name in the API (default: the --model argument)")
    server.add_argument(
        "--allowed-media-dir",
        metavar="DIR",
        help="allow file:// URLs and local paths in image_url parts, only inside DIR",
    )
    server.add_argument(
        "--allow-remote-media", action="store_true", help="let the server fetch http(s):// image URLs named by clients"
    )
    limits = parser.add_argument_group("limits (one client cannot starve the others; over a limit is a 400 naming it)")
    limits.add_argument(
        "--remote-media-timeout",
        type=_seconds,
        default=REMOTE_MEDIA_TIMEOUT_S,
        metavar="SECONDS",
        help=f"the whole download of one remote image, not each read (default: {REMOTE_MEDIA_TIMEOUT_S:g})",
    )
    limits.add_argument(
        "--remote-media-max-bytes",
        type=_amount(binary=True),
        default=REMOTE_MEDIA_MAX_BYTES,
        metavar="BYTES",
        help="size of one remote image; K/M/G suffixes are KiB/MiB/GiB (default: 32MiB)",
    )
    limits.add_argument(
        "--max-request-pixels",
        type=_amount(binary=False),
        default=MAX_REQUEST_PIXELS,
        metavar="N",
        help="width x height summed over one request's images, read from their headers before decoding "
        "(default: 64M, i.e. 64,000,000)",
    )
    limits.add_argument(
        "--max-inflight-pixels",
        type=_amount(binary=False),
        default=MAX_INFLIGHT_PIXELS,
        metavar="N",
        help="pixels being decoded at once over all requests; others wait their turn (a 503 after 60 s), "
        "text-only requests never do (default: 128M)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM / SIGINT, how long running requests may go on before they are ended with an "
        f"error event (streams) or a 503 (default: {SHUTDOWN_TIMEOUT_S:g})",
    )
    server.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    server.add_argument("--seed", type=int, default=0, help="default sampling seed")
    add_engine_arguments(parser)


def _url(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def serve_command(args: argparse.Namespace) -> int:
    from vlm.config import EngineConfig
    from vlm.errors import VlmError

    try:
        import uvicorn

        from vlm.server.app import ServerSettings, create_app
        from vlm.server.async_engine import AsyncEngine
        from vlm.server.prompts import MediaLimits
    except ImportError as exc:
        raise VlmError(
            f"the server needs fastapi, uvicorn and prometheus-client ({exc}); pip install vlm-core"
        ) from None

    logging.getLogger("vlm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.allowed_media_dir is not None and not Path(args.allowed_media_dir).is_dir():
        raise VlmError(f"--allowed-media-dir {args.allowed_media_dir!r} is not a directory")
    if not 0 <= args.port <= 65535:
        raise VlmError(f"--port {args.port} is not a port number (0-65535)")
    limits = MediaLimits(
        remote_timeout=args.remote_media_timeout,
        remote_max_bytes=args.remote_media_max_bytes,
        max_request_pixels=args.max_request_pixels,
        max_inflight_pixels=args.max_inflight_pixels,
    )
    limits.check()
    _raise_image_limit(args.max_request_pixels)
    config = EngineConfig(model=args.model, seed=args.seed, **engine_settings(args))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on %s: other machines can reach this server%s",
            args.host,
            "" if args.api_key else " (and it has no --api-key)",
        )
    logger.info("loading %s", args.model)
    engine = AsyncEngine(config).start()
    try:
        settings = ServerSettings(
            served_model_name=args.served_model_name or args.model,
            model_path=str(engine.engine.model_dir),
            api_key=args.api_key,
            allowed_media_dir=args.allowed_media_dir,
            allow_remote_media=args.allow_remote_media,
            media_limits=limits,
        )
        app = create_app(engine, settings)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            log_level="debug" if args.verbose else "info",
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout + _CONNECTION_GRACE_S,
            lifespan="off",
        )
        server = _graceful_server(uv_config, engine, app.state.server.close, args.shutdown_timeout)
        try:
            return asyncio.run(_serve(server, args.host, settings.served_model_name))
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            if exc.code:
                print(f"error: could not listen on {_url(args.host, args.port)} (see the log above)", file=sys.stderr)
                return 1
            return 0
    finally:
        engine.shutdown()


def _raise_image_limit(max_request_pixels: int) -> None:
    """Let the plugins' own image checks (vlm.inputs.images.MAX_PIXELS) admit what the server admits."""
    from vlm.inputs import images

    images.MAX_PIXELS = max(images.MAX_PIXELS, max_request_pixels)


def _graceful_server(config: Any, engine: Any, close_app: Callable[[], None], grace_s: float) -> Any:
    """A uvicorn server that stops as the module's docstring says (``grace_s``: ``--shutdown-timeout``)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, stopped by SIGTERM / SIGINT the way the module docstring says.

        uvicorn alone would let the engine thread die with the process (it re-raises the signal once
        it has stopped: status -15) and cut streams still running after its own timeout, without an
        error event or ``[DONE]``.
        """

        def __init__(self, config: Any, engine: Any, close_app: Callable[[], None], grace_s: float):
            super().__init__(config)
            self.engine = engine
            self.close_app = close_app
            self.grace_s = grace_s
            self.signals = 0
            self.stopping: asyncio.Task | None = None
            self.hurry: asyncio.Event | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            self.hurry = asyncio.Event()
            installed: list[signal.Signals] = []
            previous: dict[signal.Signals, Any] = {}
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.on_signal, sig)
                    installed.append(sig)
                except NotImplementedError:  # no add_signal_handler (Windows): the plain way
                    previous[sig] = signal.signal(sig, lambda s, f: loop.call_soon_threadsafe(self.on_signal, s))
                except (RuntimeError, ValueError):  # not the main thread: the caller handles signals
                    pass
            try:
                yield
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_signal(self, sig: int) -> None:
            self.signals += 1
            name = signal.Signals(sig).name
            if self.signals == 1:
                running = len(self.server_state.tasks)
                logger.info(
                    "%s: shutting down; no new connections, %d running request(s) get %g s to finish",
                    name,
                    running,
                    self.grace_s,
                )
                self.should_exit = True
                self.stopping = asyncio.ensure_future(self.stop_engine())
            elif self.signals == 2:
                logger.info("%s again: ending the running requests now", name)
                assert self.hurry is not None
                self.hurry.set()
            else:
                logger.info("%s again: not waiting for connections any more", name)
                self.force_exit = True

        async def stop_engine(self) -> None:
            """Let running requests finish for ``grace_s`` seconds, then stop the engine: the rest end cleanly."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.grace_s
            assert self.hurry is not None
            while self.server_state.tasks and not self.hurry.is_set() and loop.time() < deadline:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.hurry.wait(), min(0.05, max(deadline - loop.time(), 0.0)))
            if self.server_state.tasks:
                logger.info("ending %d running request(s)", len(self.server_state.tasks))
            self.close_app()
            await asyncio.to_thread(self.engine.shutdown)
            logger.info("engine stopped")

    return GracefulServer(config, engine, close_app, grace_s)


async def _serve(server: Any, host: str, model_name: str) -> int:
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else server.config.port
        url = _url(host, port)
        print(f"Serving {model_name} at {url} (OpenAI API: {url}/v1)", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve()  # raises SystemExit when it cannot bind
    finally:
        announcer.cancel()
        stopping = getattr(server, "stopping", None)
        if stopping is not None:
            await stopping  # the engine's shutdown, begun by a signal
    return 0
