"""Streamed responses (``"stream": true``): a request's outputs as server-sent events.

Each event is ``data: <json>\\n\\n``. Chat first sends one ``role`` chunk per choice; then both APIs
send a chunk whenever an engine step added text, logprobs or a finish reason to a choice. With
``stream_options.include_usage`` a last chunk with no choices carries the usage; chat's
``continuous_usage_stats`` (a vLLM extension) puts the running usage on every chunk. The stream
ends with ``data: [DONE]``. An engine failure mid-stream becomes an error event before ``[DONE]``:
the 200 status went out with the first chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from vlm.server.async_engine import RequestAbortedError, RequestStream
from vlm.server.errors import error_body
from vlm.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from vlm.server.metrics import RequestMetrics
from vlm.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
    finish_reason,
)
from vlm.server.tools import ToolCalling, tool_finish_reason

_DONE = "data: [DONE]\n\n"


#: line separators JSON may carry raw but that clients splitting events on any line break (as
#: ``str.splitlines`` does) would cut a chunk at: escaped, the JSON means the same
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(payload: BaseModel | dict) -> str:
    data = json.dumps(payload) if isinstance(payload, dict) else payload.model_dump_json()
    return f"data: {data.translate(_LINE_BREAKS)}\n\n"


@dataclass
class _Step:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # None unless the request asked for logprobs
    finish_reason: str | None


class EventStream:
    """One streamed request's events (iterate it); subclasses say what a chunk looks like."""

    def __init__(
        self,
        stream: RequestStream,
        metrics: RequestMetrics,
        token_texts: TokenTexts,
        request_id: str,
        created: int,
        model: str,
        prompt_len: int,
        num_logprobs: int | None,
        include_usage: bool,
    ):
        self.stream = stream
        self.metrics = metrics
        self.token_texts = token_texts
        self.request_id = request_id
        self.created = created
        self.model = model
        self.prompt_len = prompt_len
        self.num_logprobs = num_logprobs
        self.include_usage = include_usage
        self.completion_tokens = 0

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        raise NotImplementedError

    def opening(self) -> list[str]:
        return []

    def step_event(self, step: _Step) -> str:
        raise NotImplementedError

    def usage(self) -> Usage:
        return Usage.of(self.prompt_len, self.completion_tokens)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            for event in self.opening():
                yield event
            async for step in self._steps():
                yield self.step_event(step)
            self.metrics.finished()
            if self.include_usage:
                yield self.chunk([], self.usage())
            self.metrics.set_outcome("completed")
            yield _DONE
        except Exception as exc:  # EngineStepError, EngineStoppedError, RequestAbortedError
            self.metrics.set_outcome("aborted" if isinstance(exc, RequestAbortedError) else "failed")
            yield sse(error_body(str(exc), "server_error"))
            yield _DONE

    async def _steps(self) -> AsyncIterator[_Step]:
        """The stream's cumulative outputs as what each step added; steps that add nothing are left out."""
        sent_tokens = [0] * self.stream.n
        async for index, output in self.stream:
            self.metrics.output_arrived()
            completion = output.outputs[0]
            start, sent_tokens[index] = sent_tokens[index], len(completion.token_ids)
            new_ids = completion.token_ids[start:]
            self.completion_tokens += len(new_ids)
            logprobs = None
            if self.num_logprobs is not None and completion.logprobs is not None and new_ids:
                logprobs = completion.logprobs[start:]
            reason = finish_reason(output)
            if completion.delta or logprobs is not None or reason is not None:
                yield _Step(index, completion.delta, new_ids, logprobs, reason)


class ChatEvents(EventStream):
    """Chat chunks; with tool calling (``tools``), each choice's text goes through its
    :class:`~vlm.server.tools.ToolCallStream`: content deltas and ``tool_calls`` deltas."""

    def __init__(self, *args: Any, continuous_usage: bool, tools: ToolCalling | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.continuous_usage = continuous_usage
        self.tool_streams = [tools.stream() for _ in range(self.stream.n)] if tools is not None else None

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
            )
        )

    def running_usage(self) -> Usage | None:
        return self.usage() if self.continuous_usage else None

    def opening(self) -> list[str]:
        return [
            self.chunk(
                [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))], self.running_usage()
            )
            for index in range(self.stream.n)
        ]

    def step_event(self, step: _Step) -> str:
        logprobs = None
        if step.logprobs is not None:
            logprobs = chat_logprobs(self.token_texts, step.token_ids, step.logprobs, self.num_logprobs or 0)
        content, tool_calls, reason = step.text or None, None, step.finish_reason
        if self.tool_streams is not None:
            tool_stream = self.tool_streams[step.index]
            content, tool_calls = tool_stream.step(step.text, final=reason is not None)
            reason = tool_finish_reason(reason, tool_stream.has_calls)
        choice = ChatChunkChoice(
            index=step.index,
            delta=DeltaMessage(content=content, tool_calls=tool_calls),
            logprobs=logprobs,
            finish_reason=reason,
        )
        return self.chunk([choice], self.running_usage())


class CompletionEvents(EventStream):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.text_offsets = [0] * self.stream.n

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(
            CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def step_event(self, step: _Step) -> str:
        logprobs = None
        if step.logprobs is not None:
            logprobs = completion_logprobs(
                self.token_texts, step.token_ids, step.logprobs, self.num_logprobs or 0, self.text_offsets[step.index]
            )
        self.text_offsets[step.index] += len(step.text)
        choice = CompletionChoice(index=step.index, text=step.text, logprobs=logprobs, finish_reason=step.finish_reason)
        return self.chunk([choice])
