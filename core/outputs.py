"""What generation returns (shaped like vLLM's ``RequestOutput`` / ``CompletionOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.grounding import GroundedBox


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}
    delta: str = ""  # text added by the latest step (for streaming)
    boxes: list[GroundedBox] = field(default_factory=list)  # grounding boxes in the answer, once finished
    error: str | None = None  # with finish_reason "error": what went wrong for this request alone


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    #: with ``SamplingParams(prompt_logprobs=k)``: ``None`` for the first prompt token, then per
    #: prompt token ``{token_id: logprob}`` holding its own log-prob and the top k (as vLLM's)
    prompt_logprobs: list[dict[int, float] | None] | None = None
