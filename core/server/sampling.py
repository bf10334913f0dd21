"""A request's sampling fields as :class:`vlm.SamplingParams`, within the model's context.

Fields the request leaves out take the model's defaults (its ``generation_config.json``). When
``SamplingParams`` refuses a value, the error names the API field the client sent, which is not
always the ``SamplingParams`` field (``top_logprobs``, ``max_completion_tokens``).
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
