"""Grounding with Qwen2-VL / Qwen2.5-VL: the plugin's ``parse_grounding`` reads both formats, the
boxes come back in ``outputs[0].boxes`` in pixels of the original picture, and ``vlmrun
--draw-boxes`` outlines them there, in one-shot mode and per answer in a chat.

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
from vlm.inputs import ImageInput, ModelInputs
from vlm_plugin_qwen2vl.grounding import parse_grounding
from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

QWEN2_VL = SimpleNamespace(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
QWEN2_5_VL = SimpleNamespace(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
RED = Image.new("RGB", (1, 1), COLORS[0]).getpixel((0, 0))  # the first box's outline
GRAY = (120, 120, 120)

#: The answers, per flavour, for the wide (200 x 100) and then the tall (100 x 200) picture. The
#: tiny pixel budget resizes them to 112 x 56 and 56 x 112: Qwen2.5-VL's boxes are in those pixels.
ANSWERS = {
    # Qwen2-VL: special-token markup, coordinates in 0..1000 of the picture
    "qwen2_vl": [
        "<|object_ref_start|>the square<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>",
        "<|object_ref_start|>it<|object_ref_end|><|box_start|>(100,500),(900,900)<|box_end|>",
    ],
    # Qwen2.5-VL: JSON, pixels of the picture as the model saw it (resized)
    "qwen2_5_vl": [
        '[{"bbox_2d":[28,14,84,42],"label":"the square"}]',
        '[{"bbox_2d":[5.6,56,50.4,100.8],"label":"it"}]',
    ],
}
#: where both answers' boxes are on the original pictures
ON_WIDE, ON_TALL = (50, 25, 150, 75), (10, 100, 90, 180)


def model_inputs(*resized_sizes) -> ModelInputs:
    images = [ImageInput(None, 1, "k", extra={"resized_size": size}) for size in resized_sizes]
    return ModelInputs(token_ids=[1], images=images)


# -- the parser ------------------------------------------------------------------------------


def test_qwen2_vl_boxes_keep_their_reference_and_land_in_picture_pixels():
    answer = (
        "There are <|object_ref_start|>two dogs<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
        "<|box_start|>( 500 , 600 ),( 990 , 1000 )<|box_end|> and a ball<|box_start|>(1,2),(3,4)<|box_end|>."
    )
    # 0..1000 of the request's last picture (2000 x 1000); the first picture does not matter
    boxes = parse_grounding(answer, [(10, 10), (2000, 1000)], QWEN2_VL, model_inputs((28, 28), (56, 28)))
    assert boxes == [
        GroundedBox("two dogs", (20.0, 20.0, 600.0, 400.0)),
        GroundedBox("two dogs", (1000.0, 600.0, 1980.0, 1000.0)),
        GroundedBox("two dogs", (2.0, 2.0, 6.0, 4.0)),
    ]
    assert parse_grounding("<|box_start|>(0,0),(1000,1000)<|box_end|>", [(30, 20)], QWEN2_VL, model_inputs(None)) == [
        GroundedBox(None, (0.0, 0.0, 30.0, 20.0))
    ]


def test_qwen2_5_vl_boxes_are_pixels_of_the_resized_picture():
    answer = """```json
[
  {"bbox_2d": [12, 30, 220, 180], "label": "cat"},
  {"bbox_2d": [0, 0, 5], "label": "broken"},
  {"bbox_2d": [true, 0, 5, 5], "label": "not numbers"},
  {"bbox_2d": [300.5, 40, 400, 90]}
]
```"""
    # the model saw 560 x 280 of the 1000 x 500 picture
    boxes = parse_grounding(answer, [(1000, 500)], QWEN2_5_VL, model_inputs((560, 280)))
    assert [b.label for b in boxes] == ["cat", None]
    assert boxes[0].box == pytest.approx((12 / 0.56, 30 / 0.56, 220 / 0.56, 180 / 0.56))
    assert boxes[1].box == pytest.approx((300.5 / 0.56, 40 / 0.56, 400 / 0.56, 90 / 0.56))
    # Qwen2.5-VL's box tokens hold absolute coordinates too
    tokens = parse_grounding(
        "<|box_start|>(28,14),(84,42)<|box_end|>", [(200, 100)], QWEN2_5_VL, model_inputs((112, 56))
    )
    assert tokens == [GroundedBox(None, (50.0, 25.0, 150.0, 75.0))]


@pytest.mark.parametrize(
    "text", ["", "no boxes here (1,2),(3,4)", "<|box_start|>(1,2)<|box_end|>", '{"bbox_2d": "x"}', "[[1,2,3,4]]"]
)
def test_text_without_valid_boxes_gives_none(text):
    assert parse_grounding(text, [(100, 100)], QWEN2_VL, model_inputs((56, 56))) == []


def test_a_request_without_a_picture_gives_no_boxes():
    assert parse_grounding(ANSWERS["qwen2_vl"][0], [], QWEN2_VL, ModelInputs(token_ids=[1])) == []


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
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return {flavor: str(write_tiny_qwen2_vl(root / flavor, flavor, seed=4)) for flavor in ANSWERS}


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


@pytest.mark.parametrize("flavor", list(ANSWERS))
def test_boxes_from_the_python_api(models, pictures, scripted_answers, flavor):
    llm = LLM(models[flavor])
    scripted_answers(llm.tokenizer, ANSWERS[flavor])
    inputs = llm.engine.preprocess([{"role": "user", "content": [{"type": "image", "image": pictures.wide}]}])
    assert inputs.images[0].extra["resized_size"] == (112, 56)  # what the answers assume
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": pictures.wide}, {"type": "text", "text": "Where is the square?"}],
        }
    ]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert "<|box_start|>" not in out.text  # special tokens are not shown...
    assert out.boxes == [GroundedBox("the square", (50.0, 25.0, 150.0, 75.0))]  # ...but the boxes are parsed


@pytest.mark.parametrize("flavor", list(ANSWERS))
def test_vlmrun_draw_boxes_one_shot(models, pictures, scripted_answers, tmp_path, capsys, flavor):
    from transformers import AutoTokenizer

    scripted_answers(AutoTokenizer.from_pretrained(models[flavor]), ANSWERS[flavor])
    out = tmp_path / "boxes.png"
    argv = ["--model", models[flavor], "--image", pictures.wide, "--prompt", "Where is the square?"]
    assert main([*argv, "--draw-boxes", str(out)]) == 0
    err = capsys.readouterr().err
    assert "box: the square (50, 25, 150, 75)" in err and f"saved {out} with 1 box(es)" in err
    assert_outlined(out, ON_WIDE)


@pytest.mark.parametrize("flavor", list(ANSWERS))
def test_vlmrun_draw_boxes_in_a_chat(models, pictures, scripted_answers, tmp_path, monkeypatch, capsys, flavor):
    """Two turns, the second about a new picture: each answer is saved (OUT-1.png, OUT-2.png) with
    its box on the picture it is about, and its file name printed."""
    from transformers import AutoTokenizer

    scripted_answers(AutoTokenizer.from_pretrained(models[flavor]), ANSWERS[flavor])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Where is the square?\n/image {pictures.tall}\nAnd here?\n"))
    out = tmp_path / "chat.png"
    assert main(["--model", models[flavor], "--image", pictures.wide, "--draw-boxes", str(out)]) == 0
    err = capsys.readouterr().err
    first, second = tmp_path / "chat-1.png", tmp_path / "chat-2.png"
    assert f"saved {first} with 1 box(es)" in err and f"saved {second} with 1 box(es)" in err
    assert Image.open(first).size == (200, 100) and Image.open(second).size == (100, 200)
    assert_outlined(first, ON_WIDE)
    assert_outlined(second, ON_TALL)
