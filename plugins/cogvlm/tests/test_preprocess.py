"""CogVLM's prompts and pixels: the templates as trained, BOS + one placeholder per image token +
text, the original ``build_position_ids``, one picture per conversation, and pixels equal bit for
bit to torchvision's Resize(BICUBIC) + ToTensor + Normalize as computed in torch
(vlm_plugin_cogvlm.testing.OriginalProcessor; torchvision itself is not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import load_model_config
from vlm.errors import InputError
from vlm.loader import load_tokenizer
from vlm_plugin_cogvlm.preprocess import CogVLMPreprocessor, render
from vlm_plugin_cogvlm.reference import VISION, build_position_ids
from vlm_plugin_cogvlm.testing import OriginalProcessor


def _picture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    width, height = size
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.fixture(scope="module", params=["cogvlm2", "cogvlm", "sat"])
def setup(request, cogvlm_checkpoints):
    path = cogvlm_checkpoints[request.param]
    config = load_model_config(path)
    return CogVLMPreprocessor(load_tokenizer(Path(path)), config.hf_config, path), OriginalProcessor(path)


def test_templates_as_trained():
    history = [("What is it?", "A cat.")]
    assert render("chat", history, "Where?") == "Question: What is it? Answer: A cat.\nQuestion: Where? Answer:"
    assert render("vqa", [], "Color?") == "Question: Color? Short answer:"
    assert render("base", history, "A photo of") == "A photo of"  # base shows no earlier turns


@pytest.mark.parametrize(
    "picture",
    [
        _picture(1, (90, 50)),
        _picture(2, (1000, 37)),
        _picture(3, (1, 1)),
        _picture(4, (64, 48), "RGBA"),
        _picture(5, (33, 20), "L"),
    ],
    ids=["90x50", "1000x37", "1x1", "RGBA", "L"],
)
def test_pixels_equal_torchvisions_arithmetic_bit_for_bit(setup, picture):
    preprocessor, original = setup
    got = preprocessor.preprocess_image(picture).pixel_values
    assert got.dtype == torch.float32 and got.shape == (1, 3, original.image_size, original.image_size)
    assert torch.equal(got, original.pixels(picture)[None])


def test_prompt_layout_and_positions(setup):
    preprocessor, original = setup
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _picture(6, (50, 50))}, {"type": "text", "text": "Hi"}]}
    ]
    inputs = preprocessor(messages)
    text = original.apply_chat_template(messages)
    assert inputs.token_ids == original(text=text, images=[_picture(6, (50, 50))])["input_ids"][0].tolist()
    count = inputs.images[0].num_tokens
    assert inputs.token_ids[1 : 1 + count] == [inputs.image_token_id] * count
    assert inputs.image_token_id not in inputs.token_ids[1 + count :]
    types = torch.tensor([VISION if i in range(1, 1 + count) else 0 for i in range(len(inputs.token_ids))])
    assert torch.equal(inputs.positions, build_position_ids(types))
    assert inputs.positions[:5].tolist() == [0, 1, 2, 2, 2] and inputs.positions[count].item() == 3
    assert inputs.position_delta == int(inputs.positions[-1]) + 1 - len(inputs.token_ids)
    # text only: no placeholders, consecutive positions (the engine's default)
    text_only = preprocessor([{"role": "user", "content": "Hi"}])
    assert text_only.positions is None and text_only.images == []
    assert text_only.token_ids == [
        preprocessor.bos_token_id,
        *preprocessor.tokenizer.encode("Question: Hi Answer:", add_special_tokens=False),
    ]


def test_one_picture_per_conversation(setup):
    preprocessor, _ = setup
    two = [
        {"role": "user", "content": [{"type": "image", "image": _picture(7, (20, 20))}, {"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "image", "image": _picture(8, (20, 20))}, {"type": "text", "text": "c"}]},
    ]
    with pytest.raises(InputError, match="one picture per conversation") as error:
        preprocessor(two)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="one picture"):
        preprocessor.raw_prompt("x", [_picture(7, (20, 20)), _picture(8, (20, 20))])


def test_conversations_and_refusals(setup):
    preprocessor, _ = setup
    tokenizer = preprocessor.tokenizer
    system = preprocessor([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert system.token_ids[1:] == tokenizer.encode("Question: Be brief.\nHi Answer:", add_special_tokens=False)
    with pytest.raises(InputError, match="end with a user message"):
        preprocessor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(InputError, match="token-id prompt cannot carry a picture"):
        preprocessor([preprocessor.bos_token_id, preprocessor.image_token_id])
    assert preprocessor([5, 6, 7]).token_ids == [5, 6, 7]
    raw = preprocessor("Once upon")  # a plain string is the base rendering: BOS and the text
    assert raw.token_ids == [preprocessor.bos_token_id, *tokenizer.encode("Once upon", add_special_tokens=False)]
