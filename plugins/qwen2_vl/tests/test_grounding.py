"""Grounding with Qwen2-VL / Qwen2.5-VL: boxes in the answer come back in ``outputs[0].boxes``
and ``vlmrun --draw-boxes`` draws them where they belong on the original picture.

A random tiny model does not write boxes, so the engine's sampler is replaced by a script that
emits a fixed answer token by token; everything else (preprocessor, engine, detokenizer, CLI) is
the real path.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vlm.engine.llm_engine as llm_engine
from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm.grounding import NORMALIZED_1000, PIXELS, GroundedBox
from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

ANSWERS = {
    # Qwen2-VL: special-token markup, coordinates in 0..1000 of the picture
    "qwen2_vl": "It is <|object_ref_start|>the square<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>",
    # Qwen2.5-VL: JSON, pixels of the picture as the model saw it (resized)
    "qwen2_5_vl": '```json\n[{"bbox_2d": [28, 14, 84, 42], "label": "the square"}]\n```',
}


@pytest.fixture
def scripted_answer(monkeypatch):
    """Make the engine 'generate' ``text`` (then EOS) whatever the logits say."""

    def install(llm_tokenizer, text: str):
        script = llm_tokenizer.encode(text, add_special_tokens=False) + [
            llm_tokenizer.convert_tokens_to_ids("<|im_end|>")
        ]

        def sample(logits, seqs, eos_token_ids):
            return [script[len(seq.output_token_ids)] for seq in seqs], [None] * len(seqs), {}

        monkeypatch.setattr(llm_engine, "sample", sample)

    return install


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return {flavor: str(write_tiny_qwen2_vl(root / flavor, flavor, seed=4)) for flavor in ANSWERS}


def picture(path):
    Image.new("RGB", (200, 100), "white").save(path)
    return str(path)


@pytest.mark.parametrize("flavor", list(ANSWERS))
def test_boxes_from_the_python_api(models, scripted_answer, tmp_path, flavor):
    llm = LLM(models[flavor])
    scripted_answer(llm.tokenizer, ANSWERS[flavor])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture(tmp_path / "p.png")},
                {"type": "text", "text": "Where is the square?"},
            ],
        }
    ]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert "<|box_start|>" not in out.text  # special tokens are not shown...
    space = NORMALIZED_1000 if flavor == "qwen2_vl" else PIXELS
    box = (250.0, 250.0, 750.0, 750.0) if flavor == "qwen2_vl" else (28.0, 14.0, 84.0, 42.0)
    assert out.boxes == [GroundedBox("the square", box, space)]  # ...but the boxes are parsed


@pytest.mark.parametrize("flavor", list(ANSWERS))
def test_vlmrun_draw_boxes_lands_on_the_original_picture(models, scripted_answer, tmp_path, capsys, flavor):
    from transformers import AutoTokenizer

    scripted_answer(AutoTokenizer.from_pretrained(models[flavor]), ANSWERS[flavor])
    out = tmp_path / "boxes.png"
    args = [
        "--model",
        models[flavor],
        "--image",
        picture(tmp_path / "p.png"),
        "--prompt",
        "Where is the square?",
        "--draw-boxes",
        str(out),
    ]
    assert main(args) == 0
    assert "saved" in capsys.readouterr().err
    drawn = np.asarray(Image.open(out))
    changed = np.argwhere((drawn != 255).any(-1))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    # the tiny pixel budget resizes 200 x 100 to 112 x 56: Qwen2.5-VL's pixel box (28, 14, 84, 42)
    # on that picture, and Qwen2-VL's 0..1000 box, are both (50, 25, 150, 75) on the original
    assert (left, top, right, bottom) == (50, 25, 150, 75)
