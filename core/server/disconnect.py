"""A client that goes away has its request aborted, so that its KV blocks are freed at once.

Whole responses wait for the outputs while watching the connection (:func:`collect_or_abort`).
Streamed ones abort the request when the response ends before the request has finished
(:func:`streaming_response`): the client disconnected, or the handler was cancelled. Either way
the request counts as ``aborted``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from vlm.server.async_engine import AsyncEngine, RequestStream
from vlm.server.metrics import RequestMetrics

logger = logging.getLogger("vlm.server")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def collect_or_abort(
    engine: AsyncEngine, request: Request, stream: RequestStream, metrics: RequestMetrics
) -> dict[int, Any]:
    """Each choice's final ``RequestOutput``; raises :class:`ClientGone` if the client disconnects first."""
    work = asyncio.ensure_future(_collect(stream, metrics))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
        if not work.done() or not stream.finished:
            work.cancel()
            engine.abort(stream.request_id)
    if work in done and not work.cancelled():
        return work.result()
    metrics.set_outcome("aborted")
    logger.info("client went away; aborted %s", stream.request_id)
    raise ClientGone()


async def _collect(stream: RequestStream, metrics: RequestMetrics) -> dict[int, Any]:
    finals: dict[int, Any] = {}
    async for index, output in stream:
        metrics.output_arrived()
        if output.finished:
            finals[index] = output
    metrics.finished()
    return finals


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def streaming_response(
    events: AsyncIterable[str], engine: AsyncEngine, stream: RequestStream, metrics: RequestMetrics
) -> StreamingResponse:
    """``events`` as a server-sent-events response that aborts ``stream`` if it ends unfinished."""

    def abort_if_unfinished() -> None:
        if not stream.finished:
            engine.abort(stream.request_id)
            metrics.set_outcome("aborted")
            logger.info("client went away; aborted %s", stream.request_id)

    return _AbortOnCloseStreamingResponse(
        events,
        abort_if_unfinished,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _AbortOnCloseStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the response ends: finished, client disconnect, or cancellation."""

    def __init__(self, content: AsyncIterable[str], on_close, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
