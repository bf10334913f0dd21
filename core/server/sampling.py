"""A request's sampling fields as :class:`vlm.SamplingParams`, within the model's context.

Fields the request leaves out take the model's defaults (its ``generation_config.json``). When
``SamplingParams`` refuses a value, the error names the API field the client sent, which is not
always the ``SamplingParams`` field (``top_logprobs``, ``max_completion_tokens``).

Structured outputs come from one of ``response_format`` (OpenAI: ``json_object``, ``json_schema``),
``structured_outputs`` (vLLM) or ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` (older vLLM), or from ``tools`` with ``tool_choice`` ``"required"`` or a named
function (:mod:`vlm.server.tools`); :func:`structured_outputs_field` names the one a request used.
"""

from __future__ import annotations

import re
from typing import Any

from vlm.errors import ConfigError
from vlm.server.errors import RequestError
from vlm.server.protocol import ChatCompletionRequest, CompletionRequest

# copied as they are: the API and SamplingParams name them alike
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    prompt_field: str,
    max_model_len: int,
    defaults: dict,
) -> Any:
    """``body``'s ``SamplingParams``; ``max_tokens`` defaults to (and may not exceed) what fits after the prompt."""
    from vlm.sampling_params import SamplingParams

    if prompt_len >= max_model_len:
        raise RequestError(
            f"the prompt has {prompt_len} tokens but this model's context is {max_model_len} tokens, and at least "
            "one new token must fit; shorten the prompt",
            prompt_field,
        )
    room = max_model_len - prompt_len
    max_tokens = body.requested_max_tokens
    max_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if isinstance(body, CompletionRequest) and "max_tokens" not in body.model_fields_set:
        max_tokens = min(max_tokens or room, room)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise RequestError(
            f"{max_field}: this model's context is {max_model_len} tokens; the prompt has {prompt_len}, so at most "
            f"{room} new tokens fit, not {max_tokens}; lower {max_field} or shorten the prompt",
            max_field,
        )
    values = dict(defaults)
    for name in _SAMPLING_FIELDS:
        value = getattr(body, name)
        if value is not None:
            values[name] = value
    values["max_tokens"] = max_tokens
    values["logprobs"] = body.num_logprobs
    values["structured_outputs"] = structured_outputs(body)
    if values.get("min_tokens", 0) > max_tokens:
        raise RequestError(f"min_tokens ({values['min_tokens']}) exceeds max_tokens ({max_tokens})", "min_tokens")
    try:
        return SamplingParams(**values)
    except ConfigError as exc:
        raise _api_field_error(exc, body) from None


def _api_field_error(exc: ConfigError, body: ChatCompletionRequest | CompletionRequest) -> RequestError:
    """``SamplingParams``' refusal, naming the API field the client sent."""
    match = re.search(r"sampling parameter '([\w.]+)'", str(exc))
    field = match.group(1).split(".")[0] if match else None
    if field == "logprobs":
        field = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
    elif field == "max_tokens" and isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        field = "max_completion_tokens"
    message = str(exc).replace("sampling parameter ", "")
    return RequestError(message, field)


# vLLM's ``guided_*`` fields and the constraint each gives
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _constraints(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, dict[str, Any]]]:
    """Every structured-output constraint in ``body``: (API field, ``StructuredOutputsParams`` fields)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(body, ChatCompletionRequest):
        from vlm.server.tools import tool_request

        tools = tool_request(body)
        constraint = tools.constraint() if tools is not None else None
        if constraint is not None:
            found.append(("tools", constraint))
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        found.append(("response_format", {"json": response_format.json_schema.schema_}))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", body.structured_outputs.model_dump(by_alias=True, exclude_none=True)))
    for name, kind in _GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            found.append((name, {kind: value}))
    return found


def structured_outputs_field(body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The API field that constrains ``body``'s output, if any."""
    found = _constraints(body)
    return found[0][0] if found else None


def structured_outputs(body: ChatCompletionRequest | CompletionRequest) -> Any:
    """``body``'s :class:`~vlm.sampling_params.StructuredOutputsParams`, or None; a bad or
    ambiguous one is a :class:`RequestError` naming the API field."""
    from vlm.sampling_params import StructuredOutputsParams

    found = _constraints(body)
    if not found:
        return None
    if len(found) > 1:
        names = " and ".join("tool_choice" if name == "tools" else name for name, _ in found)
        raise RequestError(f"{names} each constrain the output; send only one of them", found[1][0])
    field, values = found[0]
    try:
        return StructuredOutputsParams(**values)
    except ConfigError as exc:
        message = str(exc)
        match = re.match(r"structured output parameter '(\w+)': (.*)", message)
        if match and field == "structured_outputs":  # name the nested field: structured_outputs.regex
            field, message = f"{field}.{match.group(1)}", match.group(2)
        elif match:  # guided_json, response_format: the field is the constraint
            message = match.group(2)
        raise RequestError(f"{field}: {message}", field) from None
