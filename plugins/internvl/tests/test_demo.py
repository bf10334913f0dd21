"""The bundled demo model (``core/demo/internvl-shapes``) answers questions about pictures it never saw.

The checkpoint is a tiny InternVL trained by ``scripts/train_demo.py`` on pictures from
:mod:`vlm.demo.shapes`. Here 100 fresh pictures (a seed neither training nor its held-out check
used) are asked one question each, through vlm (``LLM.chat``, one batch) and through transformers'
``InternVLForConditionalGeneration.generate`` (greedy, batched by question so nothing is padded):
both must be at least 95% right, and vlm must give transformers' answer on every one.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import vlm.demo
from vlm.demo import shapes

DEMO_ROOT = Path(vlm.demo.__file__).resolve().parent
TEST_SEED = 20_261_121  # training uses --seed 0, its held-out check seed 1_000_000
N_PICTURES = 100
MAX_TOKENS = 8
MIN_ACCURACY = 0.95


# the checkpoint ships inside the vlm.demo package, where `vlmrun demo` finds it
DEMO_MODEL = DEMO_ROOT / "internvl-shapes"
DEMO_PICTURES = DEMO_ROOT / "pictures"


def conversation(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def held_out():
    return shapes.make_examples(TEST_SEED, N_PICTURES)


@pytest.fixture(scope="module")
def vlm_answers(held_out) -> list[str]:
    from vlm import LLM, SamplingParams

    llm = LLM(str(DEMO_MODEL))
    outputs = llm.chat(
        [conversation(image, q) for image, q, _ in held_out], SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    )
    return [out.outputs[0].text.strip() for out in outputs]


@pytest.fixture(scope="module")
def transformers_answers(held_out) -> list[str]:
    from transformers import InternVLForConditionalGeneration

    from vlm_plugin_internvl.testing import load_reference_processor

    processor = load_reference_processor(DEMO_MODEL)
    model = InternVLForConditionalGeneration.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    by_question: dict[str, list[int]] = defaultdict(list)
    for i, (_, question, _) in enumerate(held_out):
        by_question[question].append(i)
    answers = [""] * len(held_out)
    for question, indices in by_question.items():
        inputs = processor.apply_chat_template(
            [conversation(held_out[i][0], question) for i in indices],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert int(inputs["attention_mask"].min()) == 1  # same question, same length: no padding
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(indices, texts):
            answers[i] = text.strip()
    return answers


def accuracy(held_out, answers) -> tuple[float, list]:
    wrong = [
        (q, want, got) for (_, q, want), got in zip(held_out, answers) if not shapes.answer_is_correct(q, want, got)
    ]
    return 1 - len(wrong) / len(held_out), wrong


def test_checkpoint_is_a_small_hf_internvl():
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "qwen2"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
    ):
        assert (DEMO_MODEL / name).is_file(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size < 15_000_000
    generation = json.loads((DEMO_MODEL / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["text_config"]["eos_token_id"]


def test_transformers_answers_held_out_pictures(held_out, transformers_answers):
    acc, wrong = accuracy(held_out, transformers_answers)
    assert acc >= MIN_ACCURACY, f"transformers: {acc:.0%} right; wrong (question, expected, got): {wrong}"


def test_vlm_answers_held_out_pictures(held_out, vlm_answers):
    acc, wrong = accuracy(held_out, vlm_answers)
    assert acc >= MIN_ACCURACY, f"vlm: {acc:.0%} right; wrong (question, expected, got): {wrong}"


def test_vlm_agrees_with_transformers(held_out, vlm_answers, transformers_answers):
    differ = [
        (q, ours, ref) for (_, q, _), ours, ref in zip(held_out, vlm_answers, transformers_answers) if ours != ref
    ]
    assert not differ, f"{len(differ)} answers differ (question, vlm, transformers): {differ}"


def test_bundled_pictures_are_the_generators():
    samples = shapes.sample_pictures()
    assert sorted(p.name for p in DEMO_PICTURES.glob("*.png")) == sorted(samples)
    from PIL import Image

    for name, (image, _) in samples.items():
        with Image.open(DEMO_PICTURES / name) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image)), name


def test_examples_are_deterministic_and_well_posed():
    a, b = shapes.make_examples(7, 50), shapes.make_examples(7, 50)
    assert [(q, ans) for _, q, ans in a] == [(q, ans) for _, q, ans in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    rng = random.Random(3)
    for _ in range(200):
        image, scene = shapes.make_picture(rng)
        assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert 1 <= scene.count <= shapes.MAX_SHAPES and len({s.kind for s in scene.shapes}) == 1
        for s, t in ((s, t) for i, s in enumerate(scene.shapes) for t in scene.shapes[i + 1 :]):
            assert max(abs(s.cx - t.cx), abs(s.cy - t.cy)) > s.radius + t.radius  # no overlap
        assert [q for q, _ in shapes.questions_for(scene)] == list(shapes.QUESTIONS)


@pytest.mark.parametrize(
    "expected, got, ok",
    [
        ("two", "2", True),
        ("two", "Two.", True),
        ("circle", "a circle", True),
        ("red", " RED ", True),
        ("circle", "circles", False),
        ("three", "two", False),
        ("mixed", "", False),
    ],
)
def test_answer_is_correct(expected, got, ok):
    assert shapes.answer_is_correct("question", expected, got) is ok


def test_vlmrun_demo_answers_the_bundled_pictures(capsys):
    from vlm.cli.main import main

    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = {  # file name -> (shape, colour, count), as demo/README.md lists them
        "red_circle.png": ("circle", "red", "one"),
        "green_square.png": ("square", "green", "one"),
        "yellow_triangle.png": ("triangle", "yellow", "one"),
        "two_blue_squares.png": ("square", "blue", "two"),
        "three_green_triangles.png": ("triangle", "green", "three"),
        "mixed_circles.png": ("circle", "mixed", "three"),
    }
    assert len(lines) == 3 * len(expected)
    for line in lines:
        name, rest = line.split(": ", 1)
        question, answer = rest.split(" -> ")
        index = 0 if "shape is" in question else 1 if "color" in question else 2
        assert answer == expected[name][index], line
