"""The OpenAI-compatible HTTP API (FastAPI), on top of :class:`vlm.server.async_engine.AsyncEngine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. With an API key, the ``/v1`` routes need
``Authorization: Bearer <key>``.

Images in chat messages (``image_url`` parts) are loaded here, in the preprocessing pool, under the
server's policy: ``data:`` URLs always; ``file://`` URLs and plain paths only inside
``allowed_media_dir``; ``http(s)://`` only with ``allow_remote_media``. They reach the plugin's
preprocessor as decoded PIL images (``{"type": "image", "image": <PIL.Image>}`` parts).

Every refused request is a 4xx with OpenAI's error body naming the field in ``param``; a client
that goes away (streaming or not) has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.errors import ConfigError, InputError
from vlm.server.async_engine import AsyncEngine, EngineStoppedError, RequestAbortedError, RequestStream
from vlm.server.metrics import ServerMetrics
from vlm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    RequestError,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
    new_id,
    now,
)

logger = logging.getLogger("vlm.server")

# API field -> SamplingParams field (the same name unless listed)
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "min_tokens",
    "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
)


@dataclass
class ServerSettings:
    served_model_name: str
    model_path: str | None = None
    api_key: str | None = None
    allowed_media_dir: str | None = None
    allow_remote_media: bool = False


# -- errors -------------------------------------------------------------------------------------

_UNION_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_union_label(item: Any) -> bool:
    return isinstance(item, str) and ("[" in item or item in _UNION_LABELS)


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
            continue  # the union member pydantic tried, not a field
        else:
            out += ("." if out else "") + item
    return out or None


def _validation_error(exc: RequestValidationError) -> RequestError:
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


def _sampling_param_error(exc: ConfigError, body: Any) -> RequestError:
    match = re.search(r"sampling parameter '([\w.]+)'", str(exc))
    field = match.group(1).split(".")[0] if match else None
    if field == "logprobs":
        field = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
    elif field == "max_tokens" and isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        field = "max_completion_tokens"
    message = str(exc).replace("sampling parameter ", "")
    return RequestError(message, field)


def _input_error_param(message: str, default: str) -> str:
    match = re.match(r"message (\d+)(?: part (\d+))?", message)
    if match and default == "messages":
        index, part = match.groups()
        return f"messages[{index}]" + (f".content[{part}]" if part is not None else "")
    return default


# -- token texts for logprobs ------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """A token id's text and UTF-8 bytes, as OpenAI's logprobs report them (cached)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            token = ""
        if token_id in self._special:
            return token, list(token.encode("utf-8"))
        if token and all(char in _BYTE_DECODER for char in token):
            raw = bytes(_BYTE_DECODER[char] for char in token)
            return raw.decode("utf-8", errors="replace"), list(raw)
        match = _HEX_BYTE.match(token)
        if match:
            raw = bytes([int(match.group(1), 16)])
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = token.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))


# -- the server state ---------------------------------------------------------------------------


class _Outcome:
    """Counts a request's outcome exactly once."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.value: str | None = None

    def set(self, outcome: str) -> None:
        if self.value is None:
            self.value = outcome
            self.metrics.count(outcome)


class _AbortOnCloseStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the response ends: finished, client disconnect, or cancellation."""

    def __init__(self, content: AsyncIterator[str], on_close, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.defaults = engine.default_sampling_values()
        self.created = now()
        self.allowed_dir = (
            Path(settings.allowed_media_dir).expanduser().resolve() if settings.allowed_media_dir else None
        )

    # -- helpers ---------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {self.settings.served_model_name!r} "
                "(GET /v1/models)", "model", status=404, code="model_not_found",
            )

    def load_image(self, url: str, where: str) -> Any:
        from vlm.images import load_image

        head = url[:16].lower()
        if head.startswith("data:"):
            source_kind = "data"
        elif head.startswith(("http://", "https://")):
            source_kind = "remote"
        elif "://" in url[:16] and not head.startswith("file://"):
            source_kind = "other"  # load_image explains the unsupported scheme
        else:
            source_kind = "local"
        shown = url if len(url) <= 60 else url[:40] + "..." + url[-17:]
        if source_kind == "remote" and not self.settings.allow_remote_media:
            raise RequestError(
                f"image {shown!r}: remote image URLs are disabled on this server; send the image as a "
                "data: URL, or start the server with --allow-remote-media", where,
            )
        if source_kind == "local" and self.allowed_dir is None:
            raise RequestError(
                f"image {shown!r}: local image files are disabled on this server; send the image as a "
                "data: URL, or start the server with --allowed-media-dir DIR", where,
            )
        try:
            return load_image(url, allowed_dir=self.allowed_dir, allow_remote=self.settings.allow_remote_media)
        except InputError as exc:
            raise RequestError(str(exc), where) from None

    def chat_inputs(self, messages: list[ChatMessage]) -> Any:
        """Messages -> ModelInputs (runs in the preprocessing pool)."""
        converted = []
        multimodal = self.engine.is_multimodal
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            content: Any = message.content if message.content is not None else ""
            if isinstance(content, list):
                parts: list[dict[str, Any]] = []
                first_image = None
                for j, part in enumerate(content):
                    if part.type == "text":
                        parts.append({"type": "text", "text": part.text})
                    else:
                        where = f"messages[{i}].content[{j}].image_url"
                        parts.append({"type": "image", "image": self.load_image(part.url, where)})
                        first_image = first_image or where
                if not multimodal and first_image is not None:
                    raise RequestError(
                        f"{self.settings.served_model_name!r} is a text-only model; send no images", first_image
                    )
                content = parts  # the preprocessor joins text parts for text-only templates
            item = {"role": role, "content": content}
            if message.name:
                item["name"] = message.name
            converted.append(item)
        try:
            return self.engine.preprocess(converted)
        except InputError as exc:
            raise RequestError(str(exc), _input_error_param(str(exc), "messages")) from None

    def completion_inputs(self, prompt: Any) -> Any:
        try:
            return self.engine.preprocess(prompt)
        except InputError as exc:
            raise RequestError(str(exc), "prompt") from None

    def sampling_params(self, body: ChatCompletionRequest | CompletionRequest, prompt_len: int, prompt_field: str):
        from vlm.sampling_params import SamplingParams

        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise RequestError(
                f"the prompt has {prompt_len} tokens but this model's context is {limit} tokens, and at least "
                "one new token must fit; shorten the prompt", prompt_field,
            )
        room = limit - prompt_len
        max_tokens = body.requested_max_tokens
        max_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        if isinstance(body, CompletionRequest) and "max_tokens" not in body.model_fields_set:
            max_tokens = min(max_tokens or room, room)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestError(
                f"{max_field}: this model's context is {limit} tokens; the prompt has {prompt_len}, so at most "
                f"{room} new tokens fit, not {max_tokens}; lower {max_field} or shorten the prompt", max_field,
            )
        values = dict(self.defaults)
        for name in _SAMPLING_FIELDS:
            value = getattr(body, name)
            if value is not None:
                values[name] = value
        values["max_tokens"] = max_tokens
        values["logprobs"] = body.num_logprobs
        if values.get("min_tokens", 0) > max_tokens:
            raise RequestError(f"min_tokens ({values['min_tokens']}) exceeds max_tokens ({max_tokens})", "min_tokens")
        try:
            return SamplingParams(**values)
        except ConfigError as exc:
            raise _sampling_param_error(exc, body) from None

    async def submit(
        self, inputs: Any, params: Any, n: int, request_id: str, prompt_field: str, arrival_time: float
    ) -> RequestStream:
        try:
            return await self.engine.add_request(inputs, params, n=n, request_id=request_id, arrival_time=arrival_time)
        except InputError as exc:
            raise RequestError(str(exc), prompt_field) from None
        except EngineStoppedError as exc:
            raise RequestError(str(exc), status=503, type="server_error") from None

    # -- logprobs ----------------------------------------------------------------------------

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], num: int) -> ChoiceLogprobs:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            text, raw = self.token_texts(token_id)
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:num]
            content.append(TokenLogprob(
                token=text, logprob=max(entry.get(token_id, float("-inf")), -9999.0), bytes=raw,
                top_logprobs=[
                    TopLogprob(token=self.token_texts(t)[0], logprob=max(v, -9999.0), bytes=self.token_texts(t)[1])
                    for t, v in top
                ],
            ))
        return ChoiceLogprobs(content=content)

    def completion_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]], num: int, offset: int
    ) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token_texts(token_id)[0]
            result.tokens.append(text)
            result.token_logprobs.append(max(entry.get(token_id, float("-inf")), -9999.0))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:num]
            result.top_logprobs.append({self.token_texts(t)[0]: max(v, -9999.0) for t, v in top})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    # -- running a request -------------------------------------------------------------------

    def _observe_ttft(self, stream: RequestStream, state: dict) -> None:
        if not state.get("ttft") and stream.first_output_time is not None:
            state["ttft"] = True
            self.metrics.ttft.observe(stream.first_output_time - stream.arrival_time)

    async def collect(self, stream: RequestStream) -> dict[int, Any]:
        finals: dict[int, Any] = {}
        state: dict = {}
        async for index, output in stream:
            self._observe_ttft(stream, state)
            if output.finished:
                finals[index] = output
        self.metrics.e2e.observe(time.monotonic() - stream.arrival_time)
        return finals

    async def collect_or_abort(self, request: Request, stream: RequestStream, outcome: _Outcome) -> dict[int, Any]:
        """Wait for a non-streaming result; abort it if the client disconnects first."""
        work = asyncio.ensure_future(self.collect(stream))
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
                self.engine.abort(stream.request_id)
        if work in done and not work.cancelled():
            return work.result()
        outcome.set("aborted")
        logger.info("client went away; aborted %s", stream.request_id)
        raise _ClientGone()

    def stream_response(self, events: AsyncIterator[str], stream: RequestStream, outcome: _Outcome) -> Response:
        def on_close() -> None:
            if not stream.finished:
                self.engine.abort(stream.request_id)
                outcome.set("aborted")
                logger.info("client went away; aborted %s", stream.request_id)

        return _AbortOnCloseStreamingResponse(
            events, on_close, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


class _ClientGone(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(payload: Any) -> str:
    if isinstance(payload, (dict, str)):
        import json

        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
    return f"data: {payload.model_dump_json()}\n\n"


def _finish_reason(output: Any) -> str | None:
    reason = output.outputs[0].finish_reason
    return None if reason == "abort" else reason


# -- the application -----------------------------------------------------------------------------


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (started, model loaded) under ``settings``."""
    server = Server(engine, settings)
    app = FastAPI(title="vlm", version=_version(), docs_url=None, redoc_url=None)
    app.state.server = server

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(
                "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
                status=401, code="invalid_api_key",
            )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        if 400 <= exc.status < 500:
            server.metrics.count("rejected")
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        server.metrics.count("rejected")
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(engine.dead_reason or "the engine is not running", "server_error"), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = server.metrics.render()
        return Response(content, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models() -> Response:
        card = ModelCard(
            id=settings.served_model_name, created=server.created, root=settings.model_path,
            max_model_len=engine.max_model_len,
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        body.check()
        server.check_model(body.model)
        inputs = await engine.run_in_pool(server.chat_inputs, body.messages)
        prompt_len = len(inputs.token_ids)
        params = server.sampling_params(body, prompt_len, "messages")
        request_id = new_id("chatcmpl")
        outcome = _Outcome(server.metrics)
        stream = await server.submit(inputs, params, body.n, request_id, "messages", arrival)
        created = now()
        model = settings.served_model_name
        num_logprobs = body.num_logprobs

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
            return server.stream_response(
                _chat_events(server, stream, outcome, request_id, created, model, prompt_len, num_logprobs,
                             include_usage, continuous),
                stream, outcome,
            )
        try:
            finals = await server.collect_or_abort(request, stream, outcome)
        except _ClientGone:
            return Response(status_code=499)
        except (RequestAbortedError, EngineStoppedError) as exc:
            outcome.set("failed")
            return JSONResponse(error_body(str(exc), "server_error"), status_code=503)
        except Exception as exc:  # EngineStepError and anything unexpected
            outcome.set("failed")
            return JSONResponse(error_body(str(exc), "server_error"), status_code=500)
        outcome.set("completed")
        choices = []
        completion_tokens = 0
        for index in range(body.n):
            output = finals[index].outputs[0]
            completion_tokens += len(output.token_ids)
            logprobs = None
            if num_logprobs is not None and output.logprobs is not None:
                logprobs = server.chat_logprobs(output.token_ids, output.logprobs, num_logprobs)
            choices.append(ChatChoice(
                index=index, message=AssistantMessage(content=output.text), logprobs=logprobs,
                finish_reason=_finish_reason(finals[index]),
            ))
        response = ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices,
            usage=Usage(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                        total_tokens=prompt_len + completion_tokens),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        body.check()
        server.check_model(body.model)
        inputs = await engine.run_in_pool(server.completion_inputs, body.prompt)
        prompt_len = len(inputs.token_ids)
        params = server.sampling_params(body, prompt_len, "prompt")
        request_id = new_id("cmpl")
        outcome = _Outcome(server.metrics)
        stream = await server.submit(inputs, params, body.n, request_id, "prompt", arrival)
        created = now()
        model = settings.served_model_name

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return server.stream_response(
                _completion_events(server, stream, outcome, request_id, created, model, prompt_len, body.logprobs,
                                   include_usage),
                stream, outcome,
            )
        try:
            finals = await server.collect_or_abort(request, stream, outcome)
        except _ClientGone:
            return Response(status_code=499)
        except (RequestAbortedError, EngineStoppedError) as exc:
            outcome.set("failed")
            return JSONResponse(error_body(str(exc), "server_error"), status_code=503)
        except Exception as exc:
            outcome.set("failed")
            return JSONResponse(error_body(str(exc), "server_error"), status_code=500)
        outcome.set("completed")
        choices = []
        completion_tokens = 0
        for index in range(body.n):
            output = finals[index].outputs[0]
            completion_tokens += len(output.token_ids)
            logprobs = None
            if body.logprobs is not None and output.logprobs is not None:
                logprobs = server.completion_logprobs(output.token_ids, output.logprobs, body.logprobs, 0)
            choices.append(CompletionChoice(
                index=index, text=output.text, logprobs=logprobs, finish_reason=_finish_reason(finals[index]),
            ))
        response = CompletionResponse(
            id=request_id, created=created, model=model, choices=choices,
            usage=Usage(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                        total_tokens=prompt_len + completion_tokens),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    app.include_router(v1)
    return app


async def _chat_events(
    server: Server, stream: RequestStream, outcome: _Outcome, request_id: str, created: int, model: str,
    prompt_len: int, num_logprobs: int | None, include_usage: bool, continuous_usage: bool,
) -> AsyncIterator[str]:
    sent_tokens = [0] * stream.n
    completion_tokens = 0
    state: dict = {}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    def usage() -> Usage:
        return Usage(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                     total_tokens=prompt_len + completion_tokens)

    try:
        for index in range(stream.n):
            yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                        usage() if continuous_usage else None)
        async for index, output in stream:
            server._observe_ttft(stream, state)
            completion = output.outputs[0]
            new_ids = completion.token_ids[sent_tokens[index]:]
            completion_tokens += len(new_ids)
            logprobs = None
            if num_logprobs is not None and completion.logprobs is not None and new_ids:
                logprobs = server.chat_logprobs(new_ids, completion.logprobs[sent_tokens[index]:], num_logprobs)
            sent_tokens[index] = len(completion.token_ids)
            reason = _finish_reason(output)
            if not completion.delta and logprobs is None and reason is None:
                continue
            yield chunk(
                [ChatChunkChoice(index=index, delta=DeltaMessage(content=completion.delta or None), logprobs=logprobs,
                                 finish_reason=reason)],
                usage() if continuous_usage else None,
            )
        server.metrics.e2e.observe(time.monotonic() - stream.arrival_time)
        if include_usage:
            yield chunk([], usage())
        outcome.set("completed")
        yield "data: [DONE]\n\n"
    except Exception as exc:  # EngineStepError, EngineStoppedError, RequestAbortedError
        outcome.set("aborted" if isinstance(exc, RequestAbortedError) else "failed")
        yield _sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"


async def _completion_events(
    server: Server, stream: RequestStream, outcome: _Outcome, request_id: str, created: int, model: str,
    prompt_len: int, num_logprobs: int | None, include_usage: bool,
) -> AsyncIterator[str]:
    sent_tokens = [0] * stream.n
    offsets = [0] * stream.n
    completion_tokens = 0
    state: dict = {}

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    try:
        async for index, output in stream:
            server._observe_ttft(stream, state)
            completion = output.outputs[0]
            new_ids = completion.token_ids[sent_tokens[index]:]
            completion_tokens += len(new_ids)
            logprobs = None
            if num_logprobs is not None and completion.logprobs is not None and new_ids:
                logprobs = server.completion_logprobs(
                    new_ids, completion.logprobs[sent_tokens[index]:], num_logprobs, offsets[index]
                )
            sent_tokens[index] = len(completion.token_ids)
            offsets[index] += len(completion.delta)
            reason = _finish_reason(output)
            if not completion.delta and logprobs is None and reason is None:
                continue
            yield chunk([CompletionChoice(index=index, text=completion.delta, logprobs=logprobs, finish_reason=reason)])
        server.metrics.e2e.observe(time.monotonic() - stream.arrival_time)
        if include_usage:
            yield chunk([], Usage(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                                  total_tokens=prompt_len + completion_tokens))
        outcome.set("completed")
        yield "data: [DONE]\n\n"
    except Exception as exc:
        outcome.set("aborted" if isinstance(exc, RequestAbortedError) else "failed")
        yield _sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"


def _version() -> str:
    from vlm import __version__

    return __version__
