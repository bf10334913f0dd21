"""Grounding with InternVL: the plugin's ``parse_grounding`` reads ``<ref>..</ref><box>[[..]]</box>``
(0..1000 of the picture, several boxes per reference), the boxes come back in
``outputs[0].boxes`` in pixels of the original picture, and ``vlmrun --draw-boxes`` outlines them
there, in one-shot mode and per answer in a chat.

A random tiny model does not write boxes, so the engine's sampler is replaced by a script that
emits fixed answers token by token; everything else (preprocessor, engine, detokenizer, the
plugin's hook, CLI) is the real path.
"""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import vlm.engine.llm_engine as llm_engine
from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm.grounding import COLORS, GroundedBox
from vlm_plugin_internvl.grounding import internvl_boxes, parse_grounding
from vlm_plugin_internvl.testing import write_tiny_internvl

RED = Image.new("RGB", (1, 1), COLORS[0]).getpixel((0, 0))  # the first box's outline
GRAY = (120, 120, 120)

#: answers about the wide (200 x 100) and then the tall (100 x 200) picture, in 0..1000
ANSWERS = ["<ref>the square</ref><box>[[250,250,750,750]]</box>", "<ref>it</ref><box>[[100,500,900,900]]</box>"]
#: where their boxes are on the original pictures
ON_WIDE, ON_TALL = (50, 25, 150, 75), (10, 100, 90, 180)


# -- the parser ------------------------------------------------------------------------------


def test_several_boxes_per_reference_and_boxes_without_one():
    answer = (
        "I see <ref>two dogs</ref><box>[[10,20,300,400], [ 500 , 600 , 990 , 1000 ]]</box>"
        "<box>[[1,2,3,4]]</box> and something <box>[[0,0,1000,1000]]</box>, <ref>a cat</ref> here "
        "<box>[[5,5,6,6]]</box><ref>a ball</ref><box>[[7,8,9]], [[100,100,200,200]]</box>"
    )
    assert internvl_boxes(answer) == [
        ("two dogs", (10.0, 20.0, 300.0, 400.0)),
        ("two dogs", (500.0, 600.0, 990.0, 1000.0)),
        ("two dogs", (1.0, 2.0, 3.0, 4.0)),  # a second box right after the first
        (None, (0.0, 0.0, 1000.0, 1000.0)),  # words between the reference and the box
        (None, (5.0, 5.0, 6.0, 6.0)),
        ("a ball", (100.0, 100.0, 200.0, 200.0)),  # three numbers are no box
    ]
    # in pixels of the request's last picture (2000 x 1000)
    assert parse_grounding(answer, [(10, 10), (2000, 1000)])[:2] == [
        GroundedBox("two dogs", (20.0, 20.0, 600.0, 400.0)),
        GroundedBox("two dogs", (1000.0, 600.0, 1980.0, 1000.0)),
    ]


@pytest.mark.parametrize("text", ["", "[[1,2,3,4]]", "<box>[[1,2,3]]</box>", "<box>[[1,2,3,4]]", "<ref>x</ref>"])
def test_text_without_valid_boxes_gives_none(text):
    assert parse_grounding(text, [(100, 100)]) == []


def test_a_request_without_a_picture_gives_no_boxes():
    assert parse_grounding(ANSWERS[0], []) == []


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
def scripted_answers(monkeypatch):
    """Make the engine 'generate' the k-th answer (then EOS) for its k-th request, whatever the
    logits say."""

    def install(tokenizer, answers: list[str]):
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        scripts = [tokenizer.encode(text, add_special_tokens=False) + [end] for text in answers]
        order: dict[str, int] = {}

        def sample(logits, seqs, eos_token_ids):
            tokens = []
            for seq in seqs:
                script = scripts[order.setdefault(seq.request_id, len(order)) % len(scripts)]
                tokens.append(script[len(seq.output_token_ids)])
            return tokens, [None] * len(seqs), {}

        monkeypatch.setattr(llm_engine, "sample", sample)

    return install


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_internvl(tmp_path_factory.mktemp("ivl-grounding") / "model", "hf", seed=0))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    wide, tall = root / "wide.png", root / "tall.png"
    Image.new("RGB", (200, 100), GRAY).save(wide)
    Image.new("RGB", (100, 200), GRAY).save(tall)
    return SimpleNamespace(wide=str(wide), tall=str(tall))


def assert_outlined(path, box: tuple[int, int, int, int]) -> None:
    """``box`` is outlined in the first box colour (each edge red at its middle) and nothing
    outside it changed."""
    drawn = np.asarray(Image.open(path).convert("RGB"))
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    for x, y in ((left, mid_y), (right, mid_y), (mid_x, top), (mid_x, bottom)):
        assert tuple(drawn[y, x]) == RED, f"no outline at ({x}, {y})"
    changed = np.argwhere((drawn != GRAY).any(-1))
    (y1, x1), (y2, x2) = changed.min(0), changed.max(0)
    assert (x1, y1, x2, y2) == box


def test_boxes_from_the_python_api(model_dir, pictures, scripted_answers):
    llm = LLM(model_dir)
    scripted_answers(llm.tokenizer, ANSWERS)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": pictures.wide}, {"type": "text", "text": "Where is the square?"}],
        }
    ]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=100))[0].outputs[0]
    assert out.text == ANSWERS[0]
    assert out.boxes == [GroundedBox("the square", (50.0, 25.0, 150.0, 75.0))]


def test_vlmrun_draw_boxes_one_shot_and_in_a_chat(model_dir, pictures, scripted_answers, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scripted_answers(tokenizer, ANSWERS)
    out = tmp_path / "boxes.png"
    argv = ["--model", model_dir, "--image", pictures.wide, "--prompt", "Where is the square?"]
    assert main([*argv, "--draw-boxes", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ANSWERS[0] + "\n"
    assert "box: the square (50, 25, 150, 75)" in captured.err and f"saved {out} with 1 box(es)" in captured.err
    assert_outlined(out, ON_WIDE)

    # a chat: the second turn is about a new picture; each answer is saved with its box
    scripted_answers(tokenizer, ANSWERS)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Where is the square?\n/image {pictures.tall}\nAnd here?\n"))
    out = tmp_path / "chat.png"
    assert main(["--model", model_dir, "--image", pictures.wide, "--draw-boxes", str(out)]) == 0
    err = capsys.readouterr().err
    first, second = tmp_path / "chat-1.png", tmp_path / "chat-2.png"
    assert f"saved {first} with 1 box(es)" in err and f"saved {second} with 1 box(es)" in err
    assert Image.open(second).size == (100, 200)
    assert_outlined(first, ON_WIDE)
    assert_outlined(second, ON_TALL)
