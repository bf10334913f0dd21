"""The OpenAI-compatible HTTP API (FastAPI), on top of :class:`vlm.server.async_engine.AsyncEngine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. With an API key, the ``/v1`` routes need
``Authorization: Bearer <key>``.

A completion request goes: validate (:mod:`~vlm.server.protocol`), build the prompt
(:mod:`~vlm.server.prompts`) and the sampling parameters (:mod:`~vlm.server.sampling`), submit,
then answer whole or streamed (:mod:`~vlm.server.streaming`), aborting if the client goes away
(:mod:`~vlm.server.disconnect`). Refusals and failures are OpenAI error bodies
(:mod:`~vlm.server.errors`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from vlm.errors import InputError
from vlm.server.async_engine import AsyncEngine, EngineStoppedError, RequestStream
from vlm.server.disconnect import ClientGone, collect_or_abort, streaming_response
from vlm.server.errors import RequestError, add_error_handlers, error_body, server_error
from vlm.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from vlm.server.metrics import RequestMetrics, ServerMetrics
from vlm.server.prompts import MediaLimits, PromptBuilder
from vlm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    finish_reason,
    new_id,
    now,
)
from vlm.server.sampling import sampling_params, structured_outputs_field
from vlm.server.streaming import ChatEvents, CompletionEvents, EventStream
from vlm.server.tools import ToolCalling, ToolParser, choose_tool_parser, tool_finish_reason, tool_request


@dataclass
class ServerSettings:
    """The server's options (``vlmrun serve``'s flags)."""

    served_model_name: str
    model_path: str | None = None
    api_key: str | None = None
    allowed_media_dir: str | None = None
    allow_remote_media: bool = False
    #: remote-media deadline and size, pixel budgets per request and in flight
    media_limits: MediaLimits = field(default_factory=MediaLimits)


@dataclass
class Submitted:
    """A request the engine accepted, and what every response to it names."""

    stream: RequestStream
    metrics: RequestMetrics
    request_id: str
    created: int
    model: str
    prompt_len: int


class Server:
    """What the routes share, and the steps of every completion request."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.prompts = PromptBuilder(
            engine,
            settings.served_model_name,
            settings.allowed_media_dir,
            settings.allow_remote_media,
            settings.media_limits,
        )
        self.metrics.watch_pixel_budget(self.prompts.pixels)
        self.defaults = engine.default_sampling_values()
        self.created = now()
        self._tool_parser: ToolParser | None = None

    @property
    def tool_parser(self) -> ToolParser:
        """How this model writes tool calls (chosen from its chat template, once)."""
        if self._tool_parser is None:
            self._tool_parser = choose_tool_parser(self.engine.chat_template)
        return self._tool_parser

    def close(self) -> None:
        """The server is stopping: requests still waiting to start are refused (503)."""
        self.prompts.close()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {self.settings.served_model_name!r} "
                "(GET /v1/models)",
                "model",
                status=404,
                code="model_not_found",
            )

    async def submit(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        build_inputs: Callable[[Any], Awaitable[Any]],
        prompt: Any,
        prompt_field: str,
        id_prefix: str,
    ) -> Submitted:
        """Check ``body``, build its inputs from ``prompt`` (the field ``prompt_field``) and hand it to the engine."""
        arrival = time.monotonic()
        body.check()
        self.check_model(body.model)
        inputs, params = await self.prepare(body, build_inputs, prompt, prompt_field)
        return await self.add(body, inputs, params, prompt_field, new_id(id_prefix), arrival)

    async def prepare(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        build_inputs: Callable[[Any], Awaitable[Any]],
        prompt: Any,
        prompt_field: str,
        update: dict[str, Any] | None = None,
    ) -> tuple[Any, Any]:
        """``prompt``'s inputs and ``body``'s sampling parameters for them (``update``: fields set on top)."""
        try:
            inputs = await build_inputs(prompt)
        except EngineStoppedError as exc:
            raise server_error(exc) from None
        except RequestError as exc:
            if exc.param == "prompt":  # one prompt of a batch
                exc.param = prompt_field
            raise
        params = sampling_params(body, len(inputs.token_ids), prompt_field, self.engine.max_model_len, self.defaults)
        if update:
            params = params.model_copy(update=update)
        if params.structured_outputs is not None:
            await self.compile_constraint(body, params.structured_outputs)
        return inputs, params

    async def compile_constraint(self, body: ChatCompletionRequest | CompletionRequest, constraint: Any) -> None:
        """Compile ``body``'s structured-output constraint in a worker thread, so that neither the
        event loop nor the engine thread waits for it (the engine then finds it in the cache); one
        the library cannot compile is a 400 naming the field that sent it."""
        from vlm.engine.structured import StructuredOutputError

        try:
            await self.engine.run_in_pool(self.engine.engine.structured.compile, constraint, pool="text")
        except StructuredOutputError as exc:
            field = structured_outputs_field(body)
            raise RequestError(f"{field}: {exc}", field) from None
        except EngineStoppedError as exc:
            raise server_error(exc) from None

    async def add(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        inputs: Any,
        params: Any,
        prompt_field: str,
        request_id: str,
        arrival: float,
    ) -> Submitted:
        """Hand prepared inputs to the engine (``body.n`` sequences)."""
        try:
            stream = await self.engine.add_request(
                inputs, params, n=body.n, request_id=request_id, arrival_time=arrival
            )
        except InputError as exc:
            raise RequestError(str(exc), prompt_field) from None
        except EngineStoppedError as exc:
            raise server_error(exc) from None
        return Submitted(
            stream,
            RequestMetrics(self.metrics, stream),
            request_id,
            now(),
            self.settings.served_model_name,
            len(inputs.token_ids),
        )

    def stream(
        self, submitted: Submitted, events_type: type[EventStream], num_logprobs: int | None, **options: Any
    ) -> Response:
        """The streamed response: ``events_type``'s server-sent events, ``options`` being its own."""
        events = events_type(
            submitted.stream,
            submitted.metrics,
            self.token_texts,
            submitted.request_id,
            submitted.created,
            submitted.model,
            submitted.prompt_len,
            num_logprobs,
            **options,
        )
        return streaming_response(events, self.engine, submitted.stream, submitted.metrics)

    async def respond(
        self,
        request: Request,
        submitted: Submitted | list[Submitted],
        response_type: type[BaseModel],
        choice: Callable[[int, Any], BaseModel],
        completion_tokens: Callable[[Any], int] | None = None,
    ) -> Response:
        """The whole response, once every choice finished; ``choice(index, final_output)`` builds one choice.

        :param submitted: the request, or a batch of them (one per prompt) answered together: the
            choices of the ``i``-th have indices ``i * n ...``; the response has the first one's id.
        :param completion_tokens: how many tokens a final output counts in the usage (default: all
            it generated).
        """
        batch = submitted if isinstance(submitted, list) else [submitted]
        outputs: list[Any] = []
        for position, part in enumerate(batch):
            metrics = part.metrics
            try:
                finals = await collect_or_abort(self.engine, request, part.stream, metrics)
            except ClientGone:
                self._abort_rest(batch[position + 1 :], "aborted")
                return Response(status_code=499)
            except Exception as exc:  # EngineStepError, EngineStoppedError, RequestAbortedError, anything unexpected
                metrics.set_outcome("failed")
                self._abort_rest(batch[position + 1 :], "failed")
                error = server_error(exc)
                return JSONResponse(error.body(), status_code=error.status)
            metrics.set_outcome("completed")
            outputs.extend(finals[index] for index in range(part.stream.n))
        count = completion_tokens or _generated_tokens
        first = batch[0]
        response = response_type(
            id=first.request_id,
            created=first.created,
            model=first.model,
            choices=[choice(index, output) for index, output in enumerate(outputs)],
            usage=Usage.of(sum(part.prompt_len for part in batch), sum(count(output) for output in outputs)),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    def _abort_rest(self, batch: list[Submitted], outcome: str) -> None:
        for part in batch:
            self.engine.abort(part.stream.request_id)
            part.metrics.set_outcome(outcome)

    async def submit_completions(self, body: CompletionRequest) -> list[Submitted]:
        """A completions request's prompts, each its own engine request (the same id, ``-i`` for
        the ``i``-th of a batch), once every prompt was built: a bad one refuses the whole batch.

        ``max_tokens=0`` (echo only) runs as vLLM runs it: one token is generated and left out.
        ``echo`` with ``logprobs`` asks the engine for the prompt's log-probs too.
        """
        arrival = time.monotonic()
        body.check()
        self.check_model(body.model)
        prompts = body.prompts
        fields = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
        engine_body = body.model_copy(update={"max_tokens": 1}) if body.max_tokens == 0 else body
        update = {"prompt_logprobs": body.logprobs} if body.echo and body.logprobs is not None else None
        prepared = await asyncio.gather(
            *(
                self.prepare(engine_body, self.prompts.completion_inputs, prompt, field, update)
                for prompt, field in zip(prompts, fields)
            )
        )
        request_id = new_id("cmpl")
        submitted: list[Submitted] = []
        try:
            for i, ((inputs, params), field) in enumerate(zip(prepared, fields)):
                part_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                submitted.append(await self.add(engine_body, inputs, params, field, part_id, arrival))
        except BaseException:
            self._abort_rest(submitted, "failed")
            raise
        return submitted

    def completion_choice(self, body: CompletionRequest, index: int, final: Any) -> CompletionChoice:
        """One choice of a whole completions response; with ``echo``, the prompt comes first."""
        output = final.outputs[0]
        text, token_ids = output.text, list(output.token_ids)
        logprobs: list[dict[int, float] | None] | None = output.logprobs
        if body.max_tokens == 0:  # echo only: the token generated to get here is not part of it
            text, token_ids, logprobs = "", [], []
        num_logprobs = body.logprobs
        if body.echo:
            prompt_text = final.prompt
            if prompt_text is None:
                prompt_text = self.engine.tokenizer.decode(final.prompt_token_ids)
            text = prompt_text + text
            if num_logprobs is not None:
                token_ids = list(final.prompt_token_ids) + token_ids
                logprobs = list(final.prompt_logprobs or []) + list(logprobs or [])
        choice_logprobs = None
        if num_logprobs is not None and logprobs is not None:
            choice_logprobs = completion_logprobs(self.token_texts, token_ids, logprobs, num_logprobs, 0)
        return CompletionChoice(index=index, text=text, logprobs=choice_logprobs, finish_reason=finish_reason(final))


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (started, model loaded) under ``settings``."""
    server = Server(engine, settings)
    # with an API key, the schema is not served either: every route but /health needs the key
    openapi_url = None if settings.api_key else "/openapi.json"
    app = FastAPI(title="vlm", version=_version(), docs_url=None, redoc_url=None, openapi_url=openapi_url)
    app.state.server = server
    add_error_handlers(app, server.metrics)

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(
                "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            error_body(engine.dead_reason or "the engine is not running", "server_error"), status_code=503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = server.metrics.render()
        return Response(content, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models() -> Response:
        card = ModelCard(
            id=settings.served_model_name,
            created=server.created,
            root=settings.model_path,
            max_model_len=engine.max_model_len,
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        tools = tool_request(body)
        calling = ToolCalling(tools, server.tool_parser) if tools is not None else None
        build_inputs = functools.partial(server.prompts.chat_inputs, tools=tools.tools if tools else None)
        submitted = await server.submit(body, build_inputs, body.messages, "messages", "chatcmpl")
        num_logprobs = body.num_logprobs
        if body.stream:
            options = body.stream_options
            return server.stream(
                submitted,
                ChatEvents,
                num_logprobs,
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
                tools=calling,
            )

        def choice(index: int, final: Any) -> ChatChoice:
            output = final.outputs[0]
            logprobs = None
            if num_logprobs is not None and output.logprobs is not None:
                logprobs = chat_logprobs(server.token_texts, output.token_ids, output.logprobs, num_logprobs)
            content, calls = (output.text, None) if calling is None else calling.reply(output.text)
            return ChatChoice(
                index=index,
                message=AssistantMessage(content=content, tool_calls=calls),
                logprobs=logprobs,
                finish_reason=tool_finish_reason(finish_reason(final), bool(calls)),
            )

        return await server.respond(request, submitted, ChatCompletionResponse, choice)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        submitted = await server.submit_completions(body)
        if body.stream:  # one prompt, no echo (check() refuses the rest)
            options = body.stream_options
            return server.stream(
                submitted[0], CompletionEvents, body.logprobs, include_usage=bool(options and options.include_usage)
            )
        return await server.respond(
            request,
            submitted,
            CompletionResponse,
            lambda index, final: server.completion_choice(body, index, final),
            completion_tokens=(lambda final: 0) if body.max_tokens == 0 else None,
        )

    app.include_router(v1)
    return app


def _generated_tokens(final: Any) -> int:
    return len(final.outputs[0].token_ids)


def _version() -> str:
    from vlm import __version__

    return __version__
