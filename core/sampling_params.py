"""Sampling parameters of one request (the names follow vLLM's ``SamplingParams``)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from vlm.config import Settings

#: temperatures below this sample greedily: dividing logits by them overflows (as vLLM does)
GREEDY_BELOW = 1e-5


class StructuredOutputsParams(Settings):
    """Constrain a request's output (vLLM's ``StructuredOutputsParams``): give exactly one of

    - ``json``: a JSON schema (a dict, or its JSON text); the output is JSON that validates against it;
    - ``json_object``: ``True`` for any JSON object (OpenAI's ``response_format={"type": "json_object"}``);
    - ``regex``: the output matches this regular expression as a whole;
    - ``choice``: the output is exactly one of these strings;
    - ``grammar``: a context-free grammar, in xgrammar's EBNF (GBNF-style, ``root ::= ...``) or
      Lark syntax (``start: ...``).

    ``disable_any_whitespace`` makes JSON compact (one space after ``:`` and ``,``, no newlines)
    instead of letting the model choose its whitespace (at most
    :data:`vlm.engine.structured.JSON_MAX_WHITESPACE` characters between two JSON elements).

    Example: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))``, or the
    same as a dict, ``SamplingParams(structured_outputs={"json": schema})``. A schema or pattern
    the grammar library cannot compile is a one-line :class:`vlm.errors.InputError` when the
    request is added. The model may still stop early (``max_tokens``, a stop string): only output
    that finishes with ``finish_reason == "stop"`` is guaranteed to be complete.
    """

    _what = "structured output parameter"
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=True, validate_by_name=True, validate_by_alias=True
    )
    #: the kinds of constraint, as the fields (aliases) that give them
    KINDS: ClassVar[tuple[str, ...]] = ("json", "json_object", "regex", "choice", "grammar")

    # ``json`` is an alias: a field of that name would shadow ``BaseModel.json``
    json_schema: dict[str, Any] | None = Field(None, alias="json", description="a JSON schema")
    json_object: bool = False
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    disable_any_whitespace: bool = False

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_object(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"is not valid JSON ({exc})") from None
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"a JSON schema must be a JSON object, not {type(value).__name__}")
        return value

    @field_validator("choice")
    @classmethod
    def _choices_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(c == "" for c in value):
            raise ValueError("choices must not be empty strings")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [kind for kind in self.KINDS if self.constraint(kind) not in (None, False)]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got none"
            raise ValueError(f"structured outputs need exactly one of {', '.join(self.KINDS)} ({got})")
        return self

    def constraint(self, kind: str) -> Any:
        return self.json_schema if kind == "json" else getattr(self, kind)

    @property
    def kind(self) -> str:
        """Which constraint this is: one of :attr:`KINDS`."""
        return next(kind for kind in self.KINDS if self.constraint(kind) not in (None, False))


class SamplingParams(Settings):
    """How to pick tokens for one request; a bad value is a one-line error naming the field.

    ``structured_outputs`` (a :class:`StructuredOutputsParams`, or a dict of its fields)
    constrains the output to a JSON schema, any JSON object, a regex, a choice or a grammar.
    """

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
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from the logit of every token the output already has"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted once per time a token appears in the output so far"
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="per-request seed (64 bits); reproducible")
    stop: list[str] = Field(default_factory=list, description="strings that end generation")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end it")
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probs per token")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="log-prob and top log-probs of each prompt token after the first"
    )
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="constrain the output: a JSON schema, JSON, a regex, a choice or a grammar"
    )

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

    @property
    def has_penalties(self) -> bool:
        """Any of the repetition, presence and frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
