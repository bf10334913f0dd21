"""Log-probabilities in the API's two formats, and the token texts and bytes they report.

Chat completions report each token with its UTF-8 bytes and its top alternatives
(:func:`chat_logprobs`); legacy completions report parallel lists with text offsets
(:func:`completion_logprobs`), with ``echo`` the prompt's tokens first. A token's text is its
own bytes decoded, not the vocabulary's spelling: byte-level BPE (GPT-2) vocabularies spell bytes
as printable characters, sentencepiece ones spell a space as ``▁`` and raw bytes as ``<0xNN>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vlm.server.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# JSON has no -inf: OpenAI reports impossible tokens as -9999.0
_FLOOR = -9999.0


class TokenTexts:
    """A token id's text and UTF-8 bytes, as OpenAI's logprobs report them (cached)."""

    def __init__(self, tokenizer: Any):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            token = ""
        if token_id in self._special:
            return token, list(token.encode("utf-8"))
        if token and all(char in self._byte_of for char in token):
            raw = bytes(self._byte_of[char] for char in token)
            return raw.decode("utf-8", errors="replace"), list(raw)
        match = _HEX_BYTE.match(token)
        if match:
            raw = bytes([int(match.group(1), 16)])
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = token.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))


def _chosen(entry: dict[int, float], token_id: int) -> float:
    return max(entry.get(token_id, float("-inf")), _FLOOR)


def _top(entry: dict[int, float], num: int) -> list[tuple[int, float]]:
    """The ``num`` most likely tokens of ``entry``, most likely first."""
    ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:num]
    return [(token_id, max(logprob, _FLOOR)) for token_id, logprob in ranked]


def chat_logprobs(
    texts: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float]], num: int
) -> ChoiceLogprobs:
    """Chat's format for the sampled ``token_ids`` (each with its ``num`` top alternatives)."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        text, raw = texts(token_id)
        content.append(
            TokenLogprob(
                token=text,
                logprob=_chosen(entry, token_id),
                bytes=raw,
                top_logprobs=[TopLogprob(token=texts(t)[0], logprob=v, bytes=texts(t)[1]) for t, v in _top(entry, num)],
            )
        )
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    texts: TokenTexts,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, float] | None],
    num: int,
    offset: int,
) -> CompletionLogprobs:
    """The legacy completions format; ``offset`` is where the first token's text starts in the choice's text.

    A ``None`` entry (an echoed prompt's first token, which nothing predicts) is reported as OpenAI
    does: ``null`` in ``token_logprobs`` and ``top_logprobs``.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs):
        text = texts(token_id)[0]
        result.tokens.append(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(_chosen(entry, token_id))
            result.top_logprobs.append({texts(t)[0]: v for t, v in _top(entry, num)})
        result.text_offset.append(offset)
        offset += len(text)
    return result
