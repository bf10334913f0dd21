"""Generation with the logits every token was sampled from, for parity tests against transformers."""

from __future__ import annotations

from typing import Any

import torch


def generate_with_logits(llm: Any, prompts: list, params: Any) -> list[tuple[list[int], torch.Tensor]]:
    """Run ``llm.generate(prompts, params)``; per request, its token ids and a ``[steps, vocab]``
    tensor of the logits each token was sampled from (compare with transformers' ``output_logits``)."""
    captured: dict[str, list[torch.Tensor]] = {}
    runner = llm.engine.runner
    original = runner.execute

    def execute(step):
        logits, seqs = original(step)
        if logits is not None:
            for row, seq in zip(logits, seqs):
                captured.setdefault(seq.request_id, []).append(row.clone())
        return logits, seqs

    runner.execute = execute
    try:
        outputs = llm.generate(prompts, params)
    finally:
        runner.execute = original
    return [(o.outputs[0].token_ids, torch.stack(captured[o.request_id])) for o in outputs]
