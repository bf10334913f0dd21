"""CogVLM's own chat flow through ``vlmrun --model X`` in a terminal: each conversation starts by
asking for a picture's path (Enter: text only), then questions with their history, ``/clear``
starts over (and asks again), ``/exit`` quits. Every reply equals the engine's answer to the same
conversation, so the picture and the earlier turns reached the model in CogVLM's template."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm.cli.run import PICTURE_PROMPT

#: one JSON object per answer: a random model's text holds newlines
GREEDY = ["--max-tokens", "12", "--temperature", "0", "--json"]


class Terminal(io.StringIO):
    """Typed lines: the chat reads them as from a person at a terminal (``isatty``)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chat") / "street.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_picture_then_questions_with_history_then_clear_for_text_only(cogvlm_checkpoints, picture, monkeypatch, capsys):
    model = cogvlm_checkpoints["cogvlm2"]
    typed = [picture, "Describe the picture.", "What colour is it?", "/clear", "", "Tell me a story.", "/exit"]
    monkeypatch.setattr(sys, "stdin", Terminal("\n".join(typed) + "\n"))
    assert main(["--model", model, *GREEDY]) == 0
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert len(answers) == 3, captured
    replies = [answer["text"] for answer in answers]

    street = Image.open(picture)
    first = [{"role": "user", "content": [{"type": "image", "image": street}, {"type": "text", "text": typed[1]}]}]
    second = [*first, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": typed[2]}]
    text_only = [{"role": "user", "content": typed[5]}]
    with LLM(model) as llm:
        expected = llm.chat([first, second, text_only], SamplingParams(temperature=0, max_tokens=12))
        assert [answer["token_ids"] for answer in answers] == [list(o.outputs[0].token_ids) for o in expected]
        assert replies == [output.outputs[0].text for output in expected]
        # the text-only conversation went as chat messages, not as raw text (which CogVLM renders apart)
        raw = llm.generate(typed[5], SamplingParams(temperature=0, max_tokens=12))[0]
        assert raw.prompt_token_ids != expected[2].prompt_token_ids
    assert captured.err.count(PICTURE_PROMPT) == 2  # at the start, and after /clear
    assert f"(attached {picture}; it goes with your first message)" in captured.err
