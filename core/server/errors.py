"""OpenAI-style errors: the error body, :class:`RequestError`, and how other failures become one.

Every error the server sends has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
A refused request is a 4xx whose ``param`` names the offending field as a path
(``messages[0].content[1].image_url``), whether pydantic refused it, a cross-field check did, or
vlm did (an :class:`~vlm.errors.InputError` naming a message). Engine failures are 5xx
``server_error``s: 503 when the engine stopped or aborted the request, 500 otherwise.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.server.async_engine import EngineStoppedError, RequestAbortedError
from vlm.server.metrics import ServerMetrics

logger = logging.getLogger("vlm.server")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: Any = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def server_error(exc: Exception) -> RequestError:
    """An engine failure as a response: 503 if the engine stopped or aborted the request, else 500."""
    status = 503 if isinstance(exc, (RequestAbortedError, EngineStoppedError)) else 500
    return RequestError(str(exc), status=status, type="server_error")


# -- pydantic validation errors ----------------------------------------------------------------

# pydantic puts the union member it tried into ``loc`` ("list[ContentPart]", "str"); these are not fields
_UNION_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_union_label(item: Any) -> bool:
    # a member's type: "list[ContentPart]", "str", or a model class ("NamedToolChoice"); fields are snake_case
    return isinstance(item, str) and ("[" in item or item in _UNION_LABELS or item[:1].isupper())


def _param_from_loc(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "list[ContentPart]", 1, "text")`` -> ``messages[0].content[1].text``."""
    out = ""
    items = list(loc)
    if items and items[0] == "body":
        items = items[1:]
    for item in items:
        if isinstance(item, int):
            out += f"[{item}]"
        elif _is_union_label(item):
            continue
        else:
            out += ("." if out else "") + item
    return out or None


def validation_error(exc: RequestValidationError) -> RequestError:
    """The first of pydantic's errors, as one message naming its field."""
    errors = list(exc.errors())
    if not errors:
        return RequestError("invalid request")
    # a union reports one error per member: prefer one that went past the member's type check
    informative = [e for e in errors if not (e["loc"] and _is_union_label(e["loc"][-1]))]
    err = (informative or errors)[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
    param = _param_from_loc(tuple(err["loc"]))
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = "unknown field; see the OpenAI chat-completions API for the supported ones"
    elif kind == "missing":
        message = "field required"
    elif not informative and len(errors) > 1:
        message = "has the wrong type (" + "; ".join(sorted({str(e["msg"]) for e in errors})) + ")"
    got = err.get("input")
    got_text = "" if kind in ("missing", "extra_forbidden") or isinstance(got, (dict, list)) else f" (got {got!r:.80})"
    if param is None and kind == "missing":
        return RequestError("the request needs a JSON body")
    text = f"{param}: {message}{got_text}" if param else message
    return RequestError(text, param)


# -- vlm errors ----------------------------------------------------------------------------------


def message_param(message: str) -> str:
    """The field a chat :class:`~vlm.errors.InputError` is about.

    ``message 2 part 1: ...`` -> ``messages[2].content[1]``; ``messages`` when it names no message.
    """
    match = re.match(r"message (\d+)(?: part (\d+))?", message)
    if match is None:
        return "messages"
    index, part = match.groups()
    return f"messages[{index}]" + (f".content[{part}]" if part is not None else "")


# -- the handlers ----------------------------------------------------------------------------------


def add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Send every error ``app`` raises in OpenAI's shape; count refused requests as ``rejected``."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        if 400 <= exc.status < 500:
            metrics.count("rejected")
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        metrics.count("rejected")
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)
