"""Tool calling on ``/v1/chat/completions``: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

A request's tools reach the model through its own chat template (``apply_chat_template(...,
tools=...)``, as transformers renders them), and so do the history's assistant ``tool_calls`` and
``role: "tool"`` results (:func:`template_message`). What the model writes back becomes OpenAI's
``message.tool_calls`` according to ``tool_choice``:

- ``"auto"`` (the default with tools): the model decides. Its output is read by the tool-call
  parser of the model's format (:data:`TOOL_PARSERS`): Hermes / Qwen's
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, InternLM2's
  ``<|action_start|><|plugin|>{"name": ..., "parameters": {...}}<|action_end|>`` blocks, or plain JSON
  (``{"name": ..., "arguments" | "parameters": {...}}`` or a list of them, Llama 3's format). Output
  that is not a call to one of the request's tools stays ``content``.
- ``"required"``: the output is constrained (xgrammar, :mod:`vlm.engine.structured`) to a JSON
  list of ``{"name": <a tool>, "parameters": <its arguments>}`` (one item with
  ``parallel_tool_calls=false``), so it always parses, as vLLM does it.
- a named function: the output is constrained to that function's parameters schema; it is the
  call's arguments.

Constrained calls are compact JSON (no whitespace of the model's choosing: a weak model may
otherwise write whitespace until ``max_tokens``).
- ``"none"`` (the default without tools): tools are not rendered and nothing is parsed.

A reply with calls finishes with ``finish_reason == "tool_calls"``. Streamed, content is sent as it
comes (held back only where it may be the start of a call); each call is sent as one delta once
it is complete, except a named function's arguments, which stream as they are written.

The parser is chosen from the chat template: the registered parser with the highest
``priority`` whose ``matches(template)`` is true (plugins register theirs in a child registry of
:data:`TOOL_PARSERS`, scope = the plugin's name). Nothing here imports torch.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlm.registry import Registry
from vlm.server.errors import RequestError
from vlm.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

#: tool-call parsers by name; each is a :class:`ToolParser` subclass
TOOL_PARSERS = Registry("tool_parser")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- what the model wrote ------------------------------------------------------------------------


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass
class Parsed:
    """Output read so far: ``content`` (text for the user, only ever growing as output grows),
    the complete ``calls``, and ``rest``: output that was meant as calls but is not one (shown as
    content once the output is final)."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)
    rest: str = ""


def _call_from_object(value: Any, names: set[str]) -> ParsedCall | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` naming one of ``names``, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _held_back(text: str, marker: str) -> str:
    """``text`` without a trailing start of ``marker`` (it may become one) or trailing whitespace."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            text = text[:-size]
            break
    return text.rstrip()


class ToolParser:
    """Reads tool calls out of a model's output. Subclasses set ``name`` and ``priority`` and
    implement :meth:`matches` and :meth:`read`."""

    name: ClassVar[str]
    #: among parsers whose ``matches`` is true, the highest wins
    priority: ClassVar[int] = 0

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        """Does a model with this chat template write calls in this parser's format?"""
        raise NotImplementedError

    def read(self, text: str, names: set[str], final: bool) -> Parsed:
        """The output so far (``final``: all of it) as content and complete calls to ``names``."""
        raise NotImplementedError


class BlockToolParser(ToolParser):
    """Calls as JSON objects between an ``OPEN`` and a ``CLOSE`` marker, one block per call; text
    before the first block is content. A last block the model did not close is read too when the
    output ends. Subclasses set the markers."""

    OPEN: ClassVar[str]
    CLOSE: ClassVar[str]

    def read(self, text: str, names: set[str], final: bool) -> Parsed:
        start = text.find(self.OPEN)
        if start < 0:
            return Parsed(text if final else _held_back(text, self.OPEN))
        parsed = Parsed(text[:start])
        position = start
        while True:
            opening = text.find(self.OPEN, position)
            if opening < 0:
                between = text[position:]
                if between.strip():  # text after the calls: not a call, shown as content
                    parsed.rest = between if final else ""
                return parsed
            closing = text.find(self.CLOSE, opening)
            if closing < 0 and not final:
                return parsed
            end = len(text) if closing < 0 else closing
            try:
                call = _call_from_object(json.loads(text[opening + len(self.OPEN) : end]), names)
            except ValueError:
                call = None
            if call is None or text[position:opening].strip():
                parsed.rest = text[position:] if final else ""
                return parsed
            parsed.calls.append(call)
            position = len(text) if closing < 0 else closing + len(self.CLOSE)


@TOOL_PARSERS.register_module(name="hermes")
class HermesToolParser(BlockToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Hermes, Qwen2.5,
    Qwen3)."""

    name = "hermes"
    priority = 10
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return cls.OPEN in chat_template


@TOOL_PARSERS.register_module(name="internlm2")
class InternLM2ToolParser(BlockToolParser):
    """InternLM2-chat's ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>``
    blocks. Its other action, ``<|action_start|><|interpreter|>`` (code to run), is no tool call
    and stays content. Chosen for templates that mention ``<|plugin|>`` or ``<|action_start|>``."""

    name = "internlm2"
    priority = 10
    OPEN, CLOSE = "<|action_start|><|plugin|>", "<|action_end|>"

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return "<|plugin|>" in chat_template or "<|action_start|>" in chat_template


@TOOL_PARSERS.register_module(name="json")
class JsonToolParser(ToolParser):
    """The whole output is one JSON call ``{"name": ..., "arguments" | "parameters": {...}}`` or a
    list of them (Llama 3.x's format, and what ``tool_choice="required"`` makes any model write);
    Llama 3's ``<|python_tag|>`` may precede it. The fallback for templates no other parser claims."""

    name = "json"
    priority = 0
    TAG = "<|python_tag|>"

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return True

    def read(self, text: str, names: set[str], final: bool) -> Parsed:
        body = text.lstrip()
        body = body.removeprefix(self.TAG).lstrip()
        if not body:
            return Parsed(text if final else "")
        if body[0] not in "{[":
            return Parsed(text)
        if not final:  # a call is one JSON value: read it whole
            return Parsed("")
        try:
            value = json.loads(body)
        except ValueError:
            return Parsed(text)
        items = value if isinstance(value, list) else [value]
        calls = [_call_from_object(item, names) for item in items]
        if not calls or any(call is None for call in calls):
            return Parsed(text)
        return Parsed("", [call for call in calls if call is not None])


def choose_tool_parser(chat_template: str | None) -> ToolParser:
    """The registered parser for a model with ``chat_template`` (see the module's docstring)."""
    candidates: list[type[ToolParser]] = []
    for registry in TOOL_PARSERS.walk():
        for name in list(registry.module_dict):
            parser = registry.get(name) if registry is TOOL_PARSERS else TOOL_PARSERS.get(f"{registry.scope}.{name}")
            if isinstance(parser, type) and issubclass(parser, ToolParser) and parser.matches(chat_template or ""):
                candidates.append(parser)
    return max(candidates, key=lambda parser: parser.priority)()


# -- the request ---------------------------------------------------------------------------------


def _parameters_schema(tool: Any) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


@dataclass
class ToolRequest:
    """A request's tools and ``tool_choice`` (``mode``: ``auto``, ``required`` or ``named``)."""

    mode: str
    tools: list[dict[str, Any]]  # as the client sent them: what the chat template renders
    schemas: dict[str, dict[str, Any]]  # function name -> its parameters schema
    function: str | None = None  # the named function
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return set(self.schemas)

    def constraint(self) -> dict[str, Any] | None:
        """``StructuredOutputsParams`` fields for ``required`` and named choices (else None)."""
        if self.mode == "named":
            assert self.function is not None
            return {"json": self.schemas[self.function], "disable_any_whitespace": True}
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
            }
            for name, schema in self.schemas.items()
        ]
        array: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        }
        if not self.parallel:
            array["maxItems"] = 1
        return {"json": array, "disable_any_whitespace": True}


def tool_request(body: ChatCompletionRequest) -> ToolRequest | None:
    """``body``'s tool settings, or None when it calls no tools (``tool_choice`` ``"none"``)."""
    mode = body.tool_mode
    if mode == "none" or not body.tools:
        return None
    for i, tool in enumerate(body.tools):
        schema = tool.function.parameters
        if schema is not None and schema.get("type", "object") != "object":
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON schema of type 'object' (the arguments), "
                f"not {schema.get('type')!r}",
                f"tools[{i}].function.parameters",
            )
    function = body.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
    return ToolRequest(
        mode=mode,
        tools=[tool.model_dump(exclude_unset=True) for tool in body.tools],
        schemas={tool.function.name: _parameters_schema(tool) for tool in body.tools},
        function=function,
        parallel=body.parallel_tool_calls is not False,
    )


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """The tool fields of a history message as chat templates take them (transformers'
    convention): an assistant's ``tool_calls`` with their arguments as an object (OpenAI sends
    JSON text), a tool result's ``tool_call_id``."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{index}].tool_calls[{j}].function.arguments"
            try:
                arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
            except ValueError as exc:
                raise RequestError(
                    f"{where} is not valid JSON ({exc}); send the arguments as JSON text", where
                ) from None
            calls.append(
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
            )
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


# -- the reply -----------------------------------------------------------------------------------


@dataclass
class ToolCalling:
    """One request's tool settings and its model's parser: reads outputs into replies."""

    request: ToolRequest
    parser: ToolParser

    def read(self, text: str, final: bool) -> Parsed:
        """Output so far as content and calls, by ``tool_choice``'s rule."""
        request = self.request
        if request.mode == "named":
            assert request.function is not None
            return Parsed("", [ParsedCall(request.function, text)]) if final else Parsed("")
        parser = JsonToolParser() if request.mode == "required" else self.parser
        parsed = parser.read(text, request.names, final)
        if not request.parallel and len(parsed.calls) > 1:
            parsed.calls = parsed.calls[:1]
        return parsed

    def reply(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """A whole output as a reply message's ``content`` and ``tool_calls``."""
        parsed = self.read(text, final=True)
        if not parsed.calls:
            return text, None
        content = parsed.content + parsed.rest
        calls = [
            ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls
        ]
        return (content if content.strip() else None), calls

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def tool_finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """A reply with calls that ended by itself finishes with ``"tool_calls"`` (OpenAI)."""
    return "tool_calls" if has_calls and reason == "stop" else reason


class ToolCallStream:
    """One streamed choice: what each step adds, as a content delta and tool-call deltas."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self.content_sent = 0
        self.calls_sent = 0
        self.arguments_sent = 0  # a named function's arguments, streamed as written
        self.call_id = new_call_id()

    @property
    def has_calls(self) -> bool:
        return self.calls_sent > 0

    def step(self, added: str, final: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        self.text += added
        if self.calling.request.mode == "named":
            return None, self._named_arguments()
        parsed = self.calling.read(self.text, final)
        content = parsed.content
        if final and parsed.calls and not (content[self.content_sent :] + parsed.rest).strip():
            content, parsed.rest = content[: self.content_sent], ""  # only whitespace before the calls
        if final and not parsed.calls and not self.has_calls:
            content = self.text  # no calls after all: everything held back is content
        new_content = content[self.content_sent :] + (parsed.rest if final and parsed.calls else "")
        self.content_sent = len(content)
        deltas = []
        for call in parsed.calls[self.calls_sent :]:
            deltas.append(
                DeltaToolCall(
                    index=self.calls_sent,
                    id=new_call_id(),
                    type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments),
                )
            )
            self.calls_sent += 1
        return new_content or None, deltas or None

    def _named_arguments(self) -> list[DeltaToolCall] | None:
        function = self.calling.request.function
        first = self.calls_sent == 0
        piece = self.text[self.arguments_sent :]
        self.arguments_sent = len(self.text)
        if not first and not piece:
            return None
        self.calls_sent = 1
        return [
            DeltaToolCall(
                index=0,
                id=self.call_id if first else None,
                type="function" if first else None,
                function=DeltaFunctionCall(name=function if first else None, arguments=piece),
            )
        ]
