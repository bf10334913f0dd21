"""Qwen2-VL *base* checkpoints: their chat template iterates content parts given as ``messages``
(no roles), so a chat turn renders as nothing. vlm renders such a template the way it is written
(the content parts themselves), and ``--no-chat-template`` writes the picture as the template
does; both answer like transformers on the same prompt: the base model card's raw prompt through
``Qwen2VLProcessor`` (token ids, pixels) and ``generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm_plugin_qwen2vl.testing import ReferenceModel, load_reference_processor, write_tiny_qwen2_vl

#: the template Qwen2-VL-2B (base) ships (tokenizer_config.json and chat_template.json)
BASE_TEMPLATE = (
    "{% if messages is string %}{{ messages }}{% else %}{% for content in messages %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)
QUESTION = "What is in the picture?"
NEW_TOKENS = 12
#: EOS masked for the first NEW_TOKENS, as min_new_tokens does in the reference
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    path = write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl-base") / "model", "qwen2_vl", seed=0)
    for name in ("tokenizer_config.json", "chat_template.json"):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            data["chat_template"] = BASE_TEMPLATE
            file.write_text(json.dumps(data))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / "chat_template.jinja").write_text(BASE_TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(base_checkpoint, image_path):
    """The base model card's raw prompt through transformers' processor and generate."""
    processor = load_reference_processor(base_checkpoint)
    text = "<|vision_start|><|image_pad|><|vision_end|>" + QUESTION
    batch = processor(text=[text], images=[Image.open(image_path)], return_tensors="pt")
    model = ReferenceModel.from_pretrained(base_checkpoint)
    with torch.inference_mode():
        out = model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    tokens = out[0, batch["input_ids"].shape[1] :].tolist()
    assert len(set(tokens)) >= 4, "degenerate reference output proves little"
    return batch["input_ids"][0].tolist(), batch["pixel_values"], tokens


@pytest.fixture(scope="module")
def llm(base_checkpoint):
    return LLM(base_checkpoint, dtype="float32")


def _picture_turn(image_path):
    return [{"role": "user", "content": [{"type": "image", "image": image_path}, {"type": "text", "text": QUESTION}]}]


def test_chat_turn_renders_the_content_parts_as_the_template_is_written(llm, reference, image_path):
    ids, pixels, tokens = reference
    inputs = llm.engine.preprocess(_picture_turn(image_path))
    assert inputs.prompt == "<|vision_start|><|image_pad|><|vision_end|>" + QUESTION
    assert inputs.token_ids == ids
    assert torch.equal(inputs.images[0].pixel_values, pixels)
    [out] = llm.chat(_picture_turn(image_path), GREEDY)
    assert out.outputs[0].token_ids == tokens


def test_text_chat_turn_keeps_its_text(llm):
    inputs = llm.engine.preprocess([{"role": "user", "content": "Just words."}])
    assert inputs.prompt == "Just words."


def test_raw_prompt_with_a_picture_equals_transformers(llm, reference, image_path):
    ids, _, tokens = reference
    inputs = llm.engine.preprocessor.raw_prompt(QUESTION, [image_path])
    assert inputs.token_ids == ids
    [out] = llm.generate([inputs], GREEDY)
    assert out.outputs[0].token_ids == tokens


def _vlmrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_vlmrun_answers_a_picture_with_and_without_the_template(llm, base_checkpoint, image_path):
    """The CLI (greedy, EOS ends it) prints what the Python API answers, which equals transformers above."""
    [out] = llm.chat(_picture_turn(image_path), SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    expected = out.outputs[0].text
    flags = ["--image", image_path, "--prompt", QUESTION, "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]
    with_template = _vlmrun("--model", base_checkpoint, *flags)
    raw = _vlmrun("--model", base_checkpoint, "--no-chat-template", *flags)
    for result in (with_template, raw):
        assert result.returncode == 0, result.stderr
    assert with_template.stdout == raw.stdout
    assert with_template.stdout.rstrip("\n") == expected
