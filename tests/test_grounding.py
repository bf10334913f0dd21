"""Grounding boxes in answers: parsing both conventions, mapping to the image, drawing, the engine's
``CompletionOutput.boxes`` and ``vlmrun --draw-boxes``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlm.grounding import NORMALIZED_1000, PIXELS, GroundedBox, draw_boxes, parse_boxes
from vlm.outputs import CompletionOutput, RequestOutput
from vlm.testing.checkpoints import build_byte_tokenizer

BOX_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
QWEN2_VL_ANSWER = (
    "There are <|object_ref_start|>two dogs<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
    "<|box_start|>( 500 , 600 ),( 990 , 999 )<|box_end|> and a ball<|box_start|>(1,2),(3,4)<|box_end|>."
)
QWEN2_5_VL_ANSWER = """```json
[
  {"bbox_2d": [12, 30, 220, 180], "label": "cat"},
  {"bbox_2d": [0, 0, 5], "label": "broken"},
  {"bbox_2d": [300.5, 40, 400, 90]}
]
```"""


def test_qwen2_vl_boxes_keep_their_reference():
    boxes = parse_boxes(QWEN2_VL_ANSWER)
    assert boxes == [
        GroundedBox("two dogs", (10.0, 20.0, 300.0, 400.0), NORMALIZED_1000),
        GroundedBox("two dogs", (500.0, 600.0, 990.0, 999.0), NORMALIZED_1000),
        GroundedBox("two dogs", (1.0, 2.0, 3.0, 4.0), NORMALIZED_1000),
    ]


def test_box_without_reference_has_no_label():
    assert parse_boxes("<|box_start|>(0,0),(1000,1000)<|box_end|>") == [
        GroundedBox(None, (0.0, 0.0, 1000.0, 1000.0), NORMALIZED_1000)
    ]


def test_qwen2_5_vl_json_boxes_skip_malformed_entries():
    assert parse_boxes(QWEN2_5_VL_ANSWER) == [
        GroundedBox("cat", (12.0, 30.0, 220.0, 180.0), PIXELS),
        GroundedBox(None, (300.5, 40.0, 400.0, 90.0), PIXELS),
    ]


@pytest.mark.parametrize("text", ["", "no boxes here (1,2),(3,4)", "<|box_start|>(1,2)<|box_end|>", '{"bbox_2d": "x"}'])
def test_text_without_valid_boxes_gives_none(text):
    assert parse_boxes(text) == []


def test_boxes_map_to_original_image_pixels():
    normalized = GroundedBox("a", (100, 250, 500, 1000), NORMALIZED_1000)
    assert normalized.to_image((640, 480)) == pytest.approx((64, 120, 320, 480))
    pixels = GroundedBox("b", (28, 56, 280, 112), PIXELS)
    assert pixels.to_image((1000, 500), model_image_size=(560, 280)) == pytest.approx((50, 100, 500, 200))
    assert pixels.to_image((1000, 500)) == (28, 56, 280, 112)


def test_draw_boxes_outlines_exactly_the_box():
    image = Image.new("RGB", (200, 100), "white")
    drawn = np.asarray(draw_boxes(image, [GroundedBox(None, (100, 200, 500, 800), NORMALIZED_1000)]))
    assert np.asarray(image).min() == 255, "the input image is left untouched"
    changed = np.argwhere((drawn != 255).any(-1))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    assert (left, top, right, bottom) == (20, 20, 100, 80)
    assert (drawn[50, 60] == 255).all(), "inside of the box stays as it was"


def test_engine_parses_boxes_from_the_tokens_with_special_tokens_kept(tiny_qwen2):
    from vlm.engine.output_processor import OutputProcessor

    tokenizer = build_byte_tokenizer(BOX_TOKENS)
    ids = tokenizer.encode(QWEN2_VL_ANSWER)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|box_start|>" not in text  # what the user sees in ``text``
    outputs = OutputProcessor(tokenizer, eos_token_ids=set(), max_model_len=1024)
    seq = SimpleNamespace(output_token_ids=ids, text=text)
    assert outputs._grounded_boxes(seq) == parse_boxes(QWEN2_VL_ANSWER)
    assert outputs._grounded_boxes(SimpleNamespace(output_token_ids=[1, 2], text=QWEN2_5_VL_ANSWER)) == parse_boxes(
        QWEN2_5_VL_ANSWER
    )
    assert outputs._grounded_boxes(SimpleNamespace(output_token_ids=[1, 2], text="plain")) == []


def test_vlmrun_draw_boxes_saves_the_picture(tmp_path, monkeypatch, capsys):
    """The CLI path with a stand-in engine that answers with a Qwen2-VL box."""
    import vlm.llm
    from vlm.cli import main as cli_main

    picture = tmp_path / "in.png"
    Image.new("RGB", (100, 50), "white").save(picture)
    box = GroundedBox("thing", (100, 200, 900, 800), NORMALIZED_1000)

    class FakeEngine:
        def default_sampling_values(self):
            return {}

        def preprocess(self, prompt):
            assert prompt[-1]["content"][0]["type"] == "image"
            return SimpleNamespace(images=[SimpleNamespace(extra={})])

        def stream(self, inputs, params):
            done = CompletionOutput(0, "a thing", [1], "stop", delta="a thing", boxes=[box])
            yield RequestOutput("r", None, [], [done], finished=True)

    class FakeLLM:
        def __init__(self, model, **kwargs):
            self.engine, self.tokenizer = FakeEngine(), SimpleNamespace(chat_template="x")

    monkeypatch.setattr(vlm.llm, "LLM", FakeLLM)
    out = tmp_path / "boxes.png"
    code = cli_main.main(
        ["--model", str(tmp_path), "--image", str(picture), "--prompt", "find it", "--draw-boxes", str(out)]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "a thing\n"
    assert "saved" in captured.err and "thing" in captured.err
    drawn = np.asarray(Image.open(out))
    changed = np.argwhere((drawn != 255).any(-1))
    assert tuple(changed.min(0)) == (10, 10) and tuple(changed.max(0)) == (40, 90)


def test_vlmrun_draw_boxes_needs_an_image(tmp_path):
    from vlm.cli import main as cli_main

    with pytest.raises(SystemExit, match="--draw-boxes needs --prompt and --image"):
        cli_main.main(["--model", str(tmp_path), "--prompt", "x", "--draw-boxes", str(tmp_path / "o.png")])
