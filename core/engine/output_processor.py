"""Output processing: each sampled token is appended, detokenized, checked against the stop
conditions, and turned into the :class:`RequestOutput` the caller sees (with grounding boxes once
a request finishes, from the plugin's ``parse_grounding`` hook)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vlm.engine.sequence import Sequence
from vlm.errors import VlmError
from vlm.grounding import GroundedBox
from vlm.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from vlm.plugin.manager import GroundingParser

logger = logging.getLogger("vlm")


class OutputProcessor:
    """:param parse_grounding: the chosen plugin's grounding parser
    (:func:`vlm.plugin.manager.grounding_parser`); ``None``: the family writes no boxes."""

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_model_len: int,
        parse_grounding: GroundingParser | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.parse_grounding = parse_grounding
        self._warned_sizes = False

    def append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        """Add a sampled token; sets ``seq.finish_reason`` when the sequence is done."""
        params = seq.params
        seq.output_token_ids.append(token)
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        previous_len = len(seq.text)
        seq.text += seq.detokenizer.add(token)
        n = len(seq.output_token_ids)
        if seq.grammar is not None and not self._advance_grammar(seq, token):
            return
        if n >= params.min_tokens:
            if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif params.stop:
                self._check_stop_strings(seq, previous_len)
        if seq.finish_reason is None and seq.grammar is not None and seq.grammar.terminated:
            seq.finish_reason = "stop"  # the grammar has ended: nothing may follow
        if seq.finish_reason is None and (n >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and not seq.stopped_by_string:
            seq.text += seq.detokenizer.flush()

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's grammar by ``token``; a token it refuses fails the request alone."""
        assert seq.grammar is not None
        if seq.grammar.accept(token):
            return True
        seq.finish_reason = "error"
        seq.error = (
            f"structured outputs: token {token} does not fit the request's {seq.grammar.description} "
            "(the model gave no allowed token a finite score)"
        )
        seq.text += seq.detokenizer.flush()
        return False

    def _check_stop_strings(self, seq: Sequence, previous_len: int) -> None:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, previous_len - longest + 1)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            seq.text = seq.text[: index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
            seq.finish_reason = "stop"
            seq.stopped_by_string = True

    def output(self, seq: Sequence) -> RequestOutput:
        """The request's state after its latest token, with the text added since the last output."""
        finished = seq.finish_reason is not None
        # while running, hold back text that could still become the start of a stop string
        hold = 0 if finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        visible = max(seq.num_emitted_chars, len(seq.text) - hold)
        delta = seq.text[seq.num_emitted_chars : visible]
        seq.num_emitted_chars = visible
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.inputs.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=seq.text[:visible],
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    delta=delta,
                    boxes=self._grounded_boxes(seq) if finished and seq.error is None else [],
                    error=seq.error,
                )
            ],
            finished=finished,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
        )

    def _grounded_boxes(self, seq: Sequence) -> list[GroundedBox]:
        """The boxes in a finished answer, in pixels of the original picture; a grounding parser
        that fails costs the boxes (and a warning), never the answer."""
        if self.parse_grounding is None:
            return []
        images = seq.inputs.images
        sizes = [image.extra.get("image_size") for image in images]
        if any(size is None for size in sizes):
            if not self._warned_sizes:
                self._warned_sizes = True
                logger.warning(
                    "grounding boxes are not parsed: the plugin's preprocessor does not record "
                    "ImageInput.extra['image_size'] (the original picture's width and height)"
                )
            return []
        # box markers are often special tokens, which ``text`` drops: parse with them kept
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=False)
        try:
            return self.parse_grounding(text, [(int(w), int(h)) for w, h in sizes], seq.inputs)
        except VlmError as exc:
            logger.warning("request %s: no grounding boxes: %s", seq.request_id, exc)
            return []
