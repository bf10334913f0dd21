"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vlm.engine.detokenizer import IncrementalDetokenizer
from vlm.inputs import ModelInputs
from vlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vlm.engine.structured import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    inputs: ModelInputs
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose k/v are in the cache
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full, computed blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stopped_by_string: bool = False  # text was cut at a stop string: nothing held back is emitted
    error: str | None = None  # why this request failed alone (finish_reason "error")
    text: str = ""
    num_emitted_chars: int = 0
    logprobs: list[dict[int, float]] | None = None
    # with params.prompt_logprobs: None for the first prompt token, then {token_id: logprob} per
    # prompt token as its chunk of the prompt is computed (the token's own and the top k)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # VLMs: prompt positions of the image placeholder tokens, and the features that replace them
    placeholder_positions: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    # structured outputs: the grammar's state after the output tokens (dropped when finished)
    grammar: GrammarState | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt tokens still lack their log-probs: their positions must be computed, not taken
        from the prefix cache (whose blocks hold k/v, not logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.inputs.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.inputs.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.inputs.token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt = self.inputs.token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]

    @property
    def is_prefill(self) -> bool:
        """More than one token still needs its k/v computed (a prompt, or a recomputed sequence)."""
        return self.num_tokens - self.num_computed > 1
