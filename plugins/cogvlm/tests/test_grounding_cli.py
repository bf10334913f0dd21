"""CogVLM grounding end to end: a scripted answer in CogVLM's format (``[[x0,y0,x1,y1]]`` in
0..999 of the picture, ``;`` between the boxes of one phrase) comes back from ``vlmrun
--draw-boxes`` outlined at the right pixels of the original picture, in one-shot mode and per
answer in a chat.

A random tiny model does not write boxes, so the engine's sampler is replaced by a script that
emits fixed answers token by token; everything else (the plugin's preprocessor and model, the
engine, the detokenizer, the plugin's ``parse_grounding`` hook, the CLI) is the real path. The
grounding checkpoint (``cogvlm-grounding-generalist-hf``) is CogVLM 1 with the ``base`` template;
CogVLM2 (``chat`` template) is run too.
"""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

import vlm.engine.llm_engine as llm_engine
from vlm.cli.main import main
from vlm.grounding import COLORS
from vlm_plugin_cogvlm.testing import write_tiny_cogvlm

FIRST, SECOND = (Image.new("RGB", (1, 1), color).getpixel((0, 0)) for color in COLORS[:2])  # outline colours
GRAY = (120, 120, 120)
#: the CogVLM-grounding-generalist prompts
WHERE_IS_THE_BUS = "Where is the bus? Answer in [[x0,y0,x1,y1]] format."
WHERE_ARE_THE_BUSES = "Where are the buses? Answer in [[x0,y0,x1,y1]] format."

#: The answers, in order, and where their boxes are on the pictures they are about: the wide
#: (400 x 200) picture for the first two, the tall one (200 x 400) for the third.
ANSWERS = [
    "The bus[[250,250,750,750]]",
    "Two buses[[100,100,450,900;550,100,950,500]].",
    "The bus[[100,500,900,900]]",
]
ON_WIDE = (100, 50, 300, 150)
TWO_ON_WIDE = [(40, 20, 180, 180), (220, 20, 380, 100)]
ON_TALL = (20, 200, 180, 360)
#: the image placeholder (CogVLM2: Llama 3's first reserved token; CogVLM 1: Vicuna's pad, <unk>) and
#: how many a picture takes: boi, the patches (the tiny CogVLM2 down-samples 8 x 8 to 4 x 4), eoi
IMAGE_TOKEN_IDS = {"cogvlm2": 258, "grounding-generalist": 0}
IMAGE_TOKENS = {"cogvlm2": 4 * 4 + 2, "grounding-generalist": 4 * 4 + 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory, cogvlm_checkpoints):
    root = tmp_path_factory.mktemp("grounding")
    grounding = write_tiny_cogvlm(root / "grounding-generalist", "cogvlm", seed=3, template_version="base")
    return {"grounding-generalist": str(grounding), "cogvlm2": cogvlm_checkpoints["cogvlm2"]}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    wide, tall = root / "wide.png", root / "tall.png"
    Image.new("RGB", (400, 200), GRAY).save(wide)
    Image.new("RGB", (200, 400), GRAY).save(tall)
    return SimpleNamespace(wide=str(wide), tall=str(tall))


@pytest.fixture
def scripted_answers(monkeypatch):
    """Make the engine 'generate' the k-th answer (then EOS) for its k-th request, whatever the
    logits say; returns the prompts (token ids) of the requests, in order."""
    prompts: list[list[int]] = []

    def install(model: str) -> list[list[int]]:
        tokenizer = AutoTokenizer.from_pretrained(model)
        scripts = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in ANSWERS]
        order: dict[str, int] = {}

        def sample(logits, seqs, eos_token_ids):
            tokens = []
            for seq in seqs:
                if seq.request_id not in order:
                    order[seq.request_id] = len(order)
                    prompts.append(list(seq.inputs.token_ids))
                tokens.append(scripts[order[seq.request_id]][len(seq.output_token_ids)])
            return tokens, [None] * len(seqs), {}

        monkeypatch.setattr(llm_engine, "sample", sample)
        return prompts

    return install


def assert_outlined(path, *boxes: tuple[int, int, int, int]) -> None:
    """Each box is outlined in its colour (the first red, the second green: every edge at its
    middle), and nothing outside the boxes changed."""
    drawn = np.asarray(Image.open(path).convert("RGB"))
    for box, colour in zip(boxes, (FIRST, SECOND)):
        left, top, right, bottom = box
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        for x, y in ((left, mid_y), (right, mid_y), (mid_x, top), (mid_x, bottom)):
            assert tuple(drawn[y, x]) == colour, f"no outline of {box} at ({x}, {y})"
    changed = (drawn != GRAY).any(-1)
    for left, top, right, bottom in boxes:
        changed[top : bottom + 1, left : right + 1] = False
    assert not changed.any(), f"pixels changed outside the boxes: {np.argwhere(changed)[:5].tolist()}"


@pytest.mark.parametrize("checkpoint", ["grounding-generalist", "cogvlm2"])
def test_vlmrun_draw_boxes_one_shot(models, pictures, scripted_answers, tmp_path, capsys, checkpoint):
    scripted_answers(models[checkpoint])
    out = tmp_path / "boxes.png"
    argv = ["--model", models[checkpoint], "--image", pictures.wide, "--prompt", WHERE_IS_THE_BUS]
    assert main([*argv, "--draw-boxes", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ANSWERS[0] + "\n"  # the answer as the model wrote it, boxes included
    assert "box: The bus (100, 50, 300, 150)" in captured.err and f"saved {out} with 1 box(es)" in captured.err
    assert Image.open(out).size == (400, 200)  # the original picture, not the 112 x 112 the model saw
    assert_outlined(out, ON_WIDE)


@pytest.mark.parametrize("checkpoint", ["grounding-generalist", "cogvlm2"])
def test_vlmrun_draw_boxes_in_a_chat(models, pictures, scripted_answers, tmp_path, monkeypatch, capsys, checkpoint):
    """A conversation about the wide picture (one box; a second picture refused, as CogVLM takes
    one per conversation, and dropped; then two boxes of one phrase), then a new conversation
    about the tall picture: each answer saved with its boxes on its own picture."""
    prompts = scripted_answers(models[checkpoint])
    typed = [
        WHERE_IS_THE_BUS,
        f"/image {pictures.tall}",
        "And in this one?",  # refused: a second picture in the conversation
        WHERE_ARE_THE_BUSES,  # about the wide picture still: the refused one was dropped
        "/clear",
        f"/image {pictures.tall}",
        WHERE_IS_THE_BUS,
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(typed) + "\n"))
    out = tmp_path / "chat.png"
    assert main(["--model", models[checkpoint], "--image", pictures.wide, "--draw-boxes", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(answer + "\n" for answer in ANSWERS)

    first, second, third = (tmp_path / f"chat-{n}.png" for n in (1, 2, 3))
    saved = [line for line in captured.err.splitlines() if line.startswith("saved")]
    assert saved == [f"saved {first} with 1 box(es)", f"saved {second} with 2 box(es)", f"saved {third} with 1 box(es)"]
    assert "error: CogVLM takes one picture per conversation (this one has 2)" in captured.err
    assert "(the picture attached to that message was dropped; /image attaches one again)" in captured.err
    assert "box: Two buses (40, 20, 180, 180)" in captured.err and "box: Two buses (220, 20, 380, 100)" in captured.err
    assert Image.open(first).size == Image.open(second).size == (400, 200)
    assert Image.open(third).size == (200, 400)
    assert_outlined(first, ON_WIDE)
    assert_outlined(second, *TWO_ON_WIDE)  # the picture of the conversation, though the turn sent none
    assert_outlined(third, ON_TALL)

    # every turn carried its conversation's picture; the second also the first turn, where the
    # template shows earlier turns (chat; base shows the question only); after /clear, neither
    tokenizer = AutoTokenizer.from_pretrained(models[checkpoint])
    image_tokens = [ids.count(IMAGE_TOKEN_IDS[checkpoint]) for ids in prompts]
    assert image_tokens == [IMAGE_TOKENS[checkpoint]] * 3
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in prompts]
    if checkpoint == "cogvlm2":
        assert texts[1] == f"Question: {WHERE_IS_THE_BUS} Answer: {ANSWERS[0]}\nQuestion: {WHERE_ARE_THE_BUSES} Answer:"
        assert texts[0] == texts[2] == f"Question: {WHERE_IS_THE_BUS} Answer:"
    else:
        assert texts == [WHERE_IS_THE_BUS, WHERE_ARE_THE_BUSES, WHERE_IS_THE_BUS]
