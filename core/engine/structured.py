"""Structured outputs: a request's tokens constrained to a JSON schema, JSON, a regex, a choice or
a grammar, with `xgrammar <https://github.com/mlc-ai/xgrammar>`_ (vLLM's default backend; it
runs on the CPU).

One :class:`StructuredOutputs` per engine compiles a request's
:class:`~vlm.sampling_params.StructuredOutputsParams` against the model's vocabulary (cached, so a
schema sent again compiles once) and gives each constrained sequence a :class:`GrammarState`.
Each step the sampler asks every constrained row of the batch for its allowed tokens
(:func:`apply_token_masks`: a bitmask, everything else to ``-inf``), so constrained and free
requests share one batch, greedy or sampled; the output processor then advances the row's
matcher with the token it got. A stop token (EOS) is allowed only where the grammar may end, and
a grammar that has ended finishes its request with ``finish_reason == "stop"``.

The matcher's state is a function of the request's output tokens alone: preemption (which frees
the KV blocks and recomputes prompt + output later) and prefix caching (which shares KV blocks)
keep every output token, so neither needs to roll the matcher back. A matcher is dropped with
its sequence when the request finishes or is aborted (:func:`num_live_states` counts the live ones).

Tool calling builds on :meth:`StructuredOutputs.compile` / :meth:`StructuredOutputs.matcher`
(or :func:`json_schema_constraint`) to constrain arguments to a function's JSON schema.

xgrammar is imported on first use: engines that never see a constrained request do not pay for it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from typing import Any

import torch

from vlm.errors import InputError, reason
from vlm.sampling_params import StructuredOutputsParams

#: JSON whose whitespace the model chooses may have at most this many whitespace characters
#: between two elements: enough for any indentation, and a model cannot loop on whitespace forever
JSON_MAX_WHITESPACE = 24
#: compiled grammars kept for reuse (xgrammar's own cache, by size)
CACHE_LIMIT_BYTES = 256 * 2**20

_live_states: weakref.WeakSet[GrammarState] = weakref.WeakSet()


class StructuredOutputError(InputError):
    """The grammar library cannot compile a request's schema, regex or grammar (one line)."""


def num_live_states() -> int:
    """How many :class:`GrammarState` objects (matchers) are alive in this process (for leak checks)."""
    return len(_live_states)


def json_schema_constraint(schema: dict[str, Any] | str, compact: bool = False) -> StructuredOutputsParams:
    """The constraint for JSON that validates against ``schema`` (e.g. a tool's parameters)."""
    return StructuredOutputsParams(json_schema=schema, disable_any_whitespace=compact)


def _library_message(exc: BaseException) -> str:
    """xgrammar's error without its log prefix (``[time] file.cc:123: ``) and check boilerplate."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[[\d:.]+\] \S+:\d+: ", "", text)
    text = re.sub(r"Check failed: \(.*?\) is false: ", "", text)
    return reason(RuntimeError(text) if text else exc)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


# xgrammar (0.2.9) writes the characters of a string with minLength / maxLength as "anything but
# a quote, a backslash, CR or LF", which lets raw control characters through (invalid JSON); JSON's
# own rule is "anything but a quote, a backslash or U+0000..U+001F"
_LOOSE_STRING_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\"\\\0-\x1f]"


def json_grammar(spec: StructuredOutputsParams) -> str:
    """The EBNF grammar of ``spec``'s JSON (a schema, or any object for ``json_object``)."""
    import xgrammar as xgr

    schema = json.dumps(spec.json_schema) if spec.kind == "json" else '{"type": "object"}'
    compact = spec.disable_any_whitespace
    grammar = xgr.Grammar.from_json_schema(
        schema,
        any_whitespace=not compact,
        max_whitespace_cnt=None if compact else JSON_MAX_WHITESPACE,
        # json_object: any object; a schema: only the properties it names (output still validates)
        strict_mode=spec.kind == "json",
    )
    return str(grammar).replace(_LOOSE_STRING_CHARACTER, _JSON_STRING_CHARACTER)


class GrammarState:
    """One request's position in its grammar (an xgrammar ``GrammarMatcher``)."""

    def __init__(self, matcher: Any, description: str, vocab_size: int):
        self.matcher = matcher
        self.description = description  # "JSON schema", "regex", ... (for error messages)
        self.vocab_size = vocab_size  # the width of its bitmask
        _live_states.add(self)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; ``False`` if the grammar does not allow it (the state is unchanged)."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted): nothing may follow."""
        return bool(self.matcher.is_terminated())


_DESCRIPTIONS = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


class StructuredOutputs:
    """Compiles constraints against one model's vocabulary and makes their matchers (thread-safe:
    the server compiles in a worker thread before the request reaches the engine thread).

    :param vocab_size: the width of the model's logits (may exceed the tokenizer's length).
    :param stop_token_ids: the ids that end a sequence (EOS): allowed where the grammar may end.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError as exc:
                    raise StructuredOutputError(
                        f"structured outputs need the xgrammar package ({reason(exc)}); pip install xgrammar"
                    ) from None
                try:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
                    )
                except Exception as exc:  # noqa: BLE001 - whatever the tokenizer makes the library raise
                    raise StructuredOutputError(
                        f"structured outputs are not available for this model's tokenizer: {_library_message(exc)}"
                    ) from None
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=max(1, min(8, os.cpu_count() or 1)), cache_limit_bytes=CACHE_LIMIT_BYTES
                )
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """``spec`` compiled (an xgrammar ``CompiledGrammar``; cached by content).

        :raises StructuredOutputError: the library cannot compile it; the message names the
            kind of constraint and the problem, on one line.
        """
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            if kind == "json" or kind == "json_object":
                return compiler.compile_grammar(json_grammar(spec))
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice or []))
            grammar = spec.grammar or ""
            if "::=" not in grammar:  # Lark (``start: ...``), as vLLM's other backend takes
                import xgrammar as xgr

                return compiler.compile_grammar(xgr.Grammar.from_lark(grammar))
            return compiler.compile_grammar(grammar)
        except StructuredOutputError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError subclasses
            raise StructuredOutputError(
                f"the {_DESCRIPTIONS[kind]} cannot be used for structured outputs: {_library_message(exc)}"
            ) from None

    def matcher(self, spec: StructuredOutputsParams, extra_stop_token_ids: list[int] | None = None) -> GrammarState:
        """A fresh matcher for ``spec`` (compiled, or taken from the cache).

        :param extra_stop_token_ids: ids that end this request besides EOS (its ``stop_token_ids``).
        """
        import xgrammar as xgr

        compiled = self.compile(spec)
        stops = None
        if extra_stop_token_ids:
            stops = sorted(set(self.stop_token_ids) | set(extra_stop_token_ids))
        matcher = xgr.GrammarMatcher(
            compiled,
            override_stop_tokens=stops,
            # a model without a stop token: the grammar ends the request by itself
            terminate_without_stop_token=not (stops or self.stop_token_ids),
        )
        return GrammarState(matcher, _DESCRIPTIONS[spec.kind], self.vocab_size)


def apply_token_masks(logits: torch.Tensor, states: dict[int, GrammarState]) -> dict[int, str]:
    """Set every token the grammar of row ``i`` does not allow to ``-inf``, in place, for each
    ``i`` in ``states``; rows without a state are untouched. Returns the rows that failed
    (index -> reason)."""
    import xgrammar as xgr

    failed: dict[int, str] = {}
    rows = []
    vocab_size = max(state.vocab_size for state in states.values())
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab_size)
    for row, state in states.items():
        try:
            state.fill_mask(bitmask, row)
            rows.append(row)
        except Exception as exc:  # noqa: BLE001 - one request's matcher failing fails that request alone
            failed[row] = f"structured outputs failed for this request alone ({_library_message(exc)})"
    if not rows:
        return failed
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float16, torch.bfloat16):
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    else:  # any device: unpack the bits with torch ops where the logits are
        index = torch.tensor(rows, device=logits.device)
        bits = bitmask[rows].to(logits.device)
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[1]].bool()
        logits[index, : allowed.shape[1]] = logits[index, : allowed.shape[1]].masked_fill(~allowed, float("-inf"))
    if logits.shape[1] > vocab_size:  # ids the tokenizer does not have are never allowed
        logits[torch.tensor(rows, device=logits.device), vocab_size:] = float("-inf")
    return failed
