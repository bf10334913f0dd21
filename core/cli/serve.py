"""``vlmrun serve --model DIR``: an OpenAI-compatible HTTP server (127.0.0.1:8000 by default).

Logs go to stderr; once the server listens, one line with its URL goes to stdout.

    vlmrun serve --model ./InternVL2_5-1B
    curl localhost:8000/v1/models
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from pathlib import Path

from vlm.cli.engine_args import add_engine_arguments, engine_settings

logger = logging.getLogger("vlm.server")


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
    except ImportError as exc:
        raise VlmError(
            f"the server needs fastapi, uvicorn and prometheus-client ({exc}); pip install vlm-core"
        ) from None

    logging.getLogger("vlm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.allowed_media_dir is not None and not Path(args.allowed_media_dir).is_dir():
        raise VlmError(f"--allowed-media-dir {args.allowed_media_dir!r} is not a directory")
    if not 0 <= args.port <= 65535:
        raise VlmError(f"--port {args.port} is not a port number (0-65535)")
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
        )
        app = create_app(engine, settings)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            log_level="debug" if args.verbose else "info",
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=5,
            lifespan="off",
        )
        server = uvicorn.Server(uv_config)
        try:
            return asyncio.run(_serve(server, args.host, settings.served_model_name))
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            if exc.code:
                print(f"error: could not listen on {_url(args.host, args.port)} (see the log above)", file=sys.stderr)
                return 1
            return 0
    finally:
        engine.shutdown()


async def _serve(server, host: str, model_name: str) -> int:
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
    return 0
