"""Raw prompts with pictures for every VLM family, and errors that blame the template, not the user.

``preprocessor.raw_prompt(text, images)`` (``vlmrun --no-chat-template --image``) writes each
picture in the family's raw form before the text, as the family's transformers processor takes a
raw prompt: the token ids and pixels equal the processor's on that text. A chat template that
drops pictures, or renders no user text whatever the form, is a one-line error naming the
template and ``--no-chat-template``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM
from vlm.errors import InputError


def picture(seed: int = 1, size=(90, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _checkpoint(family: str, root):
    if family == "llava":
        from vlm_plugin_llava.testing import load_reference_processor, write_tiny_llava

        return write_tiny_llava(root / family, seed=0), load_reference_processor
    if family == "internvl":
        from vlm_plugin_internvl.testing import load_reference_processor, write_tiny_internvl

        return write_tiny_internvl(root / family, "hf", seed=0), load_reference_processor
    from vlm_plugin_qwen2vl.testing import load_reference_processor, write_tiny_qwen2_vl

    return write_tiny_qwen2_vl(root / family, "qwen2_vl", seed=0), load_reference_processor


@pytest.fixture(scope="module", params=["llava", "internvl", "qwen2_vl"])
def family(request, tmp_path_factory):
    path, load_reference = _checkpoint(request.param, tmp_path_factory.mktemp("raw"))
    return request.param, str(path), LLM(str(path), dtype="float32"), load_reference(str(path))


def test_raw_prompt_with_a_picture_equals_the_family_processor(family):
    name, _, llm, processor = family
    preprocessor = llm.engine.preprocessor
    image = picture()
    inputs = preprocessor.raw_prompt("Describe it.", [image])
    text = preprocessor.raw_image_text + "Describe it."
    expected = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs.token_ids == expected["input_ids"][0].tolist(), name
    pixels = expected["pixel_values"]
    got = torch.cat([i.pixel_values for i in inputs.images])
    assert got.shape == pixels.reshape(got.shape).shape
    torch.testing.assert_close(got, pixels.reshape(got.shape), atol=1e-6, rtol=0)
    assert inputs.chat is False


def test_raw_prompt_on_a_text_only_model_refuses_pictures(tiny_qwen2):
    llm = LLM(tiny_qwen2)
    with pytest.raises(InputError, match="reads text only"):
        llm.engine.preprocessor.raw_prompt("Hi", [picture()])
    assert llm.engine.preprocessor.raw_prompt("Hi").token_ids == llm.engine.preprocess("Hi").token_ids


def _with_template(path: str, template: str) -> None:
    from pathlib import Path

    for name in ("tokenizer_config.json", "chat_template.json"):
        file = Path(path) / name
        if file.is_file():
            data = json.loads(file.read_text())
            data["chat_template"] = template
            file.write_text(json.dumps(data))
    (Path(path) / "chat_template.jinja").write_text(template)


@pytest.fixture
def qwen2_vl_dir(tmp_path):
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    return str(write_tiny_qwen2_vl(tmp_path / "q", "qwen2_vl", seed=0))


def test_a_template_that_drops_pictures_is_blamed_not_the_user(qwen2_vl_dir):
    # ChatML that renders text parts only: the picture never reaches the prompt
    _with_template(
        qwen2_vl_dir,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}<|im_end|>\n{% endfor %}",
    )
    llm = LLM(qwen2_vl_dir, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": picture()}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(InputError) as err:
        llm.engine.preprocess(messages)
    message = str(err.value)
    assert "\n" not in message
    assert "chat template" in message and "drops images" in message and "--no-chat-template" in message
    assert "remove" not in message  # no longer tells the user to edit their text
    # the raw prompt still works on such a checkpoint
    assert llm.engine.preprocessor.raw_prompt("Hi", [picture()]).images


def test_a_template_that_renders_no_user_text_is_named(qwen2_vl_dir):
    _with_template(qwen2_vl_dir, "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}")
    llm = LLM(qwen2_vl_dir, dtype="float32")
    with pytest.raises(InputError) as err:
        llm.engine.preprocess([{"role": "user", "content": "Hello"}])
    message = str(err.value)
    assert "\n" not in message and "renders no user text" in message
    assert "<|im_start|>" in message and "--no-chat-template" in message
