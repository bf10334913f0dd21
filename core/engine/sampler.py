"""Picking the next token of each sequence from its logits.

Order of processing follows transformers' ``generate``: penalties, then temperature, top-k,
top-p, min-p. The penalties are applied to the whole batch at once (:func:`apply_penalties`):
the repetition penalty (CTRL's, as transformers' ``RepetitionPenaltyLogitsProcessor``: tokens of
prompt and output), then OpenAI's frequency and presence penalties (tokens of the output only:
``logit - frequency * count - presence * (count > 0)``), as vLLM applies them. Greedy rows then
take one batched argmax. Each sequence samples from its own ``torch.Generator``, so a seed gives
the same tokens however requests are batched.

Rows with structured outputs first have every token their grammar forbids set to ``-inf``
(:mod:`vlm.engine.structured`), in the same batch as free rows. Log-probs are the model's own,
taken before any processing (the grammar's mask included), as the temperature's are.
"""

from __future__ import annotations

import torch

from vlm.engine.sequence import Sequence


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[len(token_lists), vocab_size]`` counts of each id in each list (ids outside the vocabulary dropped)."""
    width = max((len(ids) for ids in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)  # padding counts in the spare column
    for i, ids in enumerate(token_lists):
        row = torch.tensor(ids, dtype=torch.long)
        padded[i, : len(ids)] = row.masked_fill((row < 0) | (row >= vocab_size), vocab_size)
    padded = padded.to(device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logits`` with the repetition, frequency and presence penalties of every row that has one,
    in one batched computation over those rows (a new tensor; ``logits`` itself when no row has one)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.has_penalties]
    if not rows:
        return logits
    vocab_size = logits.shape[1]
    device = logits.device
    index = torch.tensor(rows, device=device)
    selected = logits[index]
    params = [seqs[i].params for i in rows]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)

    outputs = [list(seqs[i].output_token_ids) for i in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts(
            [list(seqs[i].prompt_token_ids) + ids for i, ids in zip(rows, outputs)], vocab_size, device
        )
        penalty = column([p.repetition_penalty for p in params])
        penalized = torch.where(selected < 0, selected * penalty, selected / penalty)
        selected = torch.where(seen > 0, penalized, selected)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = _token_counts(outputs, vocab_size, device).to(logits.dtype)
        selected = selected - column([p.frequency_penalty for p in params]) * counts
        selected = selected - column([p.presence_penalty for p in params]) * (counts > 0).to(logits.dtype)
    return logits.index_copy(0, index, selected)


def _filter(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if 0 < top_k < row.shape[0]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        row = row.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if min_p > 0.0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return row


class SamplingError(ValueError):
    """One row of the batch cannot be sampled (its processed logits are not finite)."""


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]
) -> tuple[list[int], list[dict[int, float] | None], dict[int, str]]:
    """``logits`` ``[N, V]`` (fp32), one row per sequence -> next token ids, optional logprobs, and
    the rows that failed (index -> reason; their token is -1). A row that fails fails alone: the
    other requests of the batch get their tokens."""
    failed: dict[int, str] = {}
    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    wants_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(-1) if any(wants_logprobs) else None
    # (getattr: callers may pass stand-ins for sequences that predate structured outputs)
    grammars = {i: g for i, g in enumerate(getattr(s, "grammar", None) for s in seqs) if g is not None}
    if grammars:
        from vlm.engine.structured import apply_token_masks

        failed.update(apply_token_masks(logits, grammars))

    logits = apply_penalties(logits, seqs)

    simple = all(s.params.greedy and len(s.output_token_ids) >= s.params.min_tokens for s in seqs)
    if simple:
        tokens = logits.argmax(-1).tolist()
        for i in failed:
            tokens[i] = -1
    else:
        tokens = []
        for i, seq in enumerate(seqs):
            if i in failed:
                tokens.append(-1)
                continue
            try:
                tokens.append(_sample_row(logits[i], seq, eos_token_ids))
            except (SamplingError, RuntimeError) as exc:
                failed[i] = f"sampling failed for this request alone ({exc}); check its sampling parameters"
                tokens.append(-1)
    if raw_logprobs is not None:
        for i, seq in enumerate(seqs):
            if wants_logprobs[i] and i not in failed:
                row = raw_logprobs[i]
                top = torch.topk(row, seq.params.logprobs) if seq.params.logprobs else None
                entry = {tokens[i]: float(row[tokens[i]])}
                if top is not None:
                    entry.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
                logprobs[i] = entry
    return tokens, logprobs, failed


def _sample_row(logits: torch.Tensor, seq: Sequence, eos_token_ids: set[int]) -> int:
    p = seq.params
    row = logits.clone()
    if len(seq.output_token_ids) < p.min_tokens:
        banned = [t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < row.shape[0]]
        scores = row[banned]
        row[banned] = float("-inf")
        if getattr(seq, "grammar", None) is not None and not bool(torch.isfinite(row).any()):
            row[banned] = scores  # the grammar allows nothing but its end: it ends here, min_tokens or not
    if p.greedy:
        return int(row.argmax())
    row = _filter(row / p.temperature, p.top_k, p.top_p, p.min_p)
    probs = row.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError("the processed logits are not finite")
    return int(torch.multinomial(probs, 1, generator=seq.generator))
