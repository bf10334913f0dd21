"""Sampling parameters of one request (the names follow vLLM's ``SamplingParams``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from vlm.config import Settings

#: temperatures below this sample greedily: dividing logits by them overflows (as vLLM does)
GREEDY_BELOW = 1e-5


class SamplingParams(Settings):
    """How to pick tokens for one request; a bad value is a one-line error naming the field."""

    _what = "sampling parameter"

    max_tokens: int = Field(256, ge=1, description="new tokens at most")
    min_tokens: int = Field(0, ge=0, description="new tokens before EOS / stop may end it")
    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description=f"0 (or below {GREEDY_BELOW}, which would overflow the logits) means greedy"
    )
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p * p(top)")
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10.0, description="CTRL-style penalty on tokens seen in prompt or output"
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="per-request seed (64 bits); reproducible")
    stop: list[str] = Field(default_factory=list, description="strings that end generation")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end it")
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probs per token")
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        for stop in value:
            try:
                stop.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"stop string {stop!r} is not valid Unicode (a lone surrogate); it could never match"
                ) from None
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_not_negative(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be token ids (0 or more)")
        return value

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1
