"""Request and response schemas of the OpenAI API, as pydantic models.

They follow OpenAI's chat-completions and (legacy) completions API closely enough that the
official ``openai`` client works unchanged, plus the sampling extensions vLLM users know
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``). Requests refuse unknown fields, so a
misspelled parameter is a 400 naming it rather than silently ignored.

Cross-field checks (``check()``) raise :class:`vlm.server.errors.RequestError`, which names the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlm.server.errors import RequestError

# -- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
    url: str = Field(min_length=1, description="data:image/...;base64,..., file://, a local path or http(s)://")
    detail: Optional[Literal["auto", "low", "high"]] = None


class VideoURL(_Lenient):
    url: str = Field(min_length=1, description="a local path or file:// URL, data:video/...;base64,..., or http(s)://")


class ContentPart(_Lenient):
    """One part of a message's content: ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url"}``,
    ``{"type": "video_url", "video_url"}`` (vLLM's extension) or ``{"type": "video", "video"}`` (a
    video file's URL, or its frames as image URLs, as qwen-vl-utils takes them). Video parts may
    carry sampling options (``fps``, ``max_frames``, ...: ``vlm.inputs.messages.VIDEO_OPTION_KEYS``)."""

    type: Literal["text", "image_url", "video_url", "video"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None
    video_url: Optional[Union[VideoURL, str]] = None
    video: Optional[Union[str, list[str]]] = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs {'image_url': {'url': ...}}")
        if self.type == "video_url" and self.video_url is None:
            raise ValueError("a video_url part needs {'video_url': {'url': ...}}")
        if self.type == "video" and not self.video:
            raise ValueError("a video part needs 'video': a video URL or a non-empty list of frame URLs")
        return self

    @property
    def url(self) -> str:
        """The image's or the video file's URL (not for a video given as frames: :attr:`frames`)."""
        if self.type == "video_url":
            return self.video_url.url if isinstance(self.video_url, VideoURL) else str(self.video_url)
        if self.type == "video":
            return str(self.video)
        return self.image_url.url if isinstance(self.image_url, ImageURL) else str(self.image_url)

    @property
    def frames(self) -> list[str] | None:
        """A video part's frames (image URLs), or None."""
        return self.video if self.type == "video" and isinstance(self.video, list) else None


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call, in an assistant message of the history or of a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    #: an assistant turn's tool calls; a ``tool`` message answers one of them by its id
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _tool_fields_for_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


#: OpenAI's rule for function names
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(_Lenient):
    """A tool's function: its name, what it does and its arguments' JSON schema."""

    name: str = Field(pattern=FUNCTION_NAME_PATTERN, description="letters, digits, _ and -, at most 64")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="the arguments' JSON schema (an object)")
    strict: Optional[bool] = None


class ChatTool(_Lenient):
    """One entry of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Lenient):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    # ``schema`` is an alias: a field of that name would shadow ``BaseModel.schema``
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="the JSON schema")
    strict: Optional[bool] = Field(None, description="the output always follows the schema here")


class ResponseFormat(_Lenient):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against a schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema: {'name': ..., 'schema': {...}}")
        return self


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs`` extra field: exactly one of ``json``, ``json_object``,
    ``regex``, ``choice``, ``grammar`` (see :class:`vlm.sampling_params.StructuredOutputsParams`)."""

    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json", description="a JSON schema")
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = Field(None, description="EBNF (root ::= ...) or Lark (start: ...)")
    disable_any_whitespace: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: Optional[str] = Field(None, description="the served model's name (GET /v1/models)")
    n: int = Field(1, ge=1, le=128)
    temperature: Optional[float] = Field(None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM extensions
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs, as vLLM takes them: ``structured_outputs`` (vLLM >= 0.12) or the
    # ``guided_*`` fields older clients send
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="a JSON schema")
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in values):
            raise ValueError("stop strings must not be empty")
        return value

    def check(self) -> None:
        """Checks across fields (raised as :class:`RequestError` so that they name a field)."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", "stream_options")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[ChatTool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError(
                f"must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
                f"not {value!r}"
            )
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_tool_names(cls, value: Optional[list[ChatTool]]) -> Optional[list[ChatTool]]:
        names = [tool.function.name for tool in value or []]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"function names must be distinct; {', '.join(map(repr, repeated))} is given twice")
        return value

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            shown = choice if isinstance(choice, str) else "a named function"
            raise RequestError(
                f"tool_choice {shown!r} needs tools; send the tools or leave tool_choice out", "tool_choice"
            )
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or []]
            if choice.function.name not in names:
                raise RequestError(
                    f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                    f"({', '.join(map(repr, names))}); name one of them",
                    "tool_choice.function.name",
                )

    @property
    def tool_mode(self) -> str:
        """``"none"``, ``"auto"``, ``"required"`` or ``"named"``: OpenAI's default is ``"auto"`` with
        tools and ``"none"`` without."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice is not None:
            return self.tool_choice if self.tools else "none"
        return "auto" if self.tools else "none"

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


#: prompts one completions request may batch
MAX_PROMPTS = 256


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(
        description="a string, token ids, or a batch of either (one choice per prompt, index = prompt * n + i)"
    )
    max_tokens: Optional[int] = Field(
        16, ge=0, description="OpenAI's default for completions is 16; 0 with echo=true: only the prompt, scored"
    )
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="the prompt before the completion (with logprobs: the prompt's too)")
    response_format: Optional[ResponseFormat] = Field(
        None, description="as chat's: json_object or json_schema constrain the completion (a vLLM extension)"
    )
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, not {len(value)}; split the batch")
            if not all(value):
                raise ValueError("the prompts must not be empty")
            if len(value) == 1:
                value = value[0]
        if not value:
            raise ValueError("the prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Optional[str]) -> Optional[str]:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported by this server; leave it out or equal to n", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError(
                "max_tokens=0 generates nothing; it is only for echo=true (the prompt and, with logprobs, its "
                "log-probs); ask for at least 1 token",
                "max_tokens",
            )
        if self.stream and self.echo:
            raise RequestError("echo is not supported with stream=true; send stream=false", "echo")
        if self.stream and len(self.prompts) > 1:
            raise RequestError(
                "stream=true takes one prompt; send a batch of prompts with stream=false, or one request each",
                "prompt",
            )

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The request's prompts: each a string or token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]  # type: ignore[list-item]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs


# -- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(output: Any) -> str | None:
    """A ``RequestOutput``'s finish reason as the API reports it (an aborted choice has none)."""
    reason = output.outputs[0].finish_reason
    return None if reason == "abort" else reason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """A streamed piece of the ``index``-th tool call: the first names it (id, type, function name),
    the next ones add to its arguments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
