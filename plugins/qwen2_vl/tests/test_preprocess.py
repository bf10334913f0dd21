"""Qwen2-VL preprocessing parity: token ids, patches and grids equal to transformers'
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` with ``Qwen2VLImageProcessorPil``, exactly, and
M-RoPE positions equal to ``get_rope_index``.

Two pixel budgets: the tiny checkpoints' (4 to 12 merged tokens per picture) and the real
models' (``min_pixels`` 3136, ``max_pixels`` 12845056, as Qwen's own preprocessor_config.json
writes them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import load_model_config
from vlm.errors import ConfigError, InputError
from vlm.testing.conformance import odd_images
from vlm_plugin_qwen2vl.preprocess import ImageSettings, Qwen2VLPreprocessor, smart_resize
from vlm_plugin_qwen2vl.testing import load_reference_processor, write_tiny_qwen2_vl

REAL_BUDGET = {"min_pixels": 3136, "max_pixels": 12845056}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: the hardest case for resampling parity."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


#: the conformance kit's odd sizes and modes (1x1, 17x300, RGBA, L, P, CMYK, ...), and pictures
#: beyond the pixel budgets
IMAGES = {
    **dict(odd_images()),
    "1000x50 RGB": noise(1000, 50),
    "800x600 RGB": noise(800, 600),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl-preprocess")
    tiny = write_tiny_qwen2_vl(root / "tiny", "qwen2_vl")
    # the real models' budget, written as Qwen's files write it (top-level min/max_pixels)
    real = write_tiny_qwen2_vl(root / "real", "qwen2_5_vl")
    config = json.loads((real / "preprocessor_config.json").read_text())
    config.pop("size")
    (real / "preprocessor_config.json").write_text(json.dumps({**config, **REAL_BUDGET}))
    return {"tiny": tiny, "real": real}


@pytest.fixture(scope="module")
def pairs(checkpoints):
    """(ours, transformers') per budget."""
    from transformers import AutoTokenizer

    return {
        name: (
            Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path),
            load_reference_processor(path),
        )
        for name, path in checkpoints.items()
    }


def user(*parts):
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


def check(ours, reference, messages):
    expected = reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    got = ours(messages)
    assert got.token_ids == expected["input_ids"][0].tolist()
    assert got.image_token_id == reference.image_token_id
    if "pixel_values" in expected:
        pixels = torch.cat([image.pixel_values for image in got.images])
        assert pixels.dtype == expected["pixel_values"].dtype == torch.float32
        assert torch.equal(pixels, expected["pixel_values"])  # bit for bit
        grids = torch.tensor([list(image.extra["image_grid_thw"]) for image in got.images])
        assert torch.equal(grids, expected["image_grid_thw"])
    else:
        assert got.images == [] and got.positions is None and got.position_delta == 0
    assert got.token_ids.count(got.image_token_id) == sum(image.num_tokens for image in got.images)
    return got


@pytest.mark.parametrize("budget", ["tiny", "real"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_one_image_equals_transformers(pairs, budget, name):
    ours, reference = pairs[budget]
    check(ours, reference, user(IMAGES[name], "What is this?"))


def test_two_images_text_only_and_history(pairs):
    ours, reference = pairs["tiny"]
    check(ours, reference, user("Compare", noise(90, 50, seed=1), "with", noise(50, 200, seed=2), "please."))
    check(ours, reference, [{"role": "user", "content": "No picture."}])
    check(
        ours,
        reference,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": noise(64, 64)}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "Noise."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": noise(30, 80, seed=3)}],
            },
        ],
    )


def test_positions_equal_get_rope_index(pairs, checkpoints):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    ours, reference = pairs["tiny"]
    messages = user(noise(90, 50, seed=1), "and", noise(300, 17, seed=2), noise(1, 1), "?")
    expected = reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    # get_rope_index reads only the config: call it without building the model
    config = Qwen2VLConfig.from_pretrained(checkpoints["tiny"])
    holder = type(
        "Holder",
        (),
        {
            "config": config,
            "get_rope_index": Qwen2VLModel.get_rope_index,
            "get_vision_position_ids": Qwen2VLModel.get_vision_position_ids,
        },
    )()
    positions, deltas = holder.get_rope_index(
        expected["input_ids"], expected["mm_token_type_ids"], expected["image_grid_thw"]
    )
    got = ours(messages)
    assert torch.equal(got.positions, positions[:, 0])
    assert got.position_delta == int(deltas[0, 0]) != 0


def test_settings_from_either_file_layout(checkpoints):
    tiny = ImageSettings.from_model_dir(checkpoints["tiny"])
    assert (tiny.min_pixels, tiny.max_pixels, tiny.patch_size, tiny.merge_size) == (3136, 9408, 14, 2)
    real = ImageSettings.from_model_dir(checkpoints["real"])
    assert (real.min_pixels, real.max_pixels) == (3136, 12845056)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for height, width in [(1, 1), (17, 300), (28, 28), (1000, 50), (4000, 3000), (57, 85), (199, 1)]:
        for budget in ((3136, 9408), (3136, 12845056), (56 * 56, 28 * 28 * 4)):
            assert smart_resize(height, width, 28, *budget) == reference(height, width, 28, *budget)


def test_too_elongated_picture_is_a_one_line_error(pairs):
    ours, reference = pairs["tiny"]
    picture = noise(2010, 10)
    with pytest.raises(ValueError, match="aspect ratio"):  # transformers refuses it too
        reference.image_processor(picture)
    with pytest.raises(InputError, match=r"2010x10 picture has an aspect ratio above 200:1") as error:
        ours(user(picture, "What?"))
    assert "\n" not in str(error.value)


def test_image_key_covers_the_grid(pairs):
    """A flat picture and its transpose have equal patches but different positions."""
    ours, _ = pairs["tiny"]
    wide = ours(user(Image.new("RGB", (112, 56), (10, 200, 30)), "?")).images[0]
    tall = ours(user(Image.new("RGB", (56, 112), (10, 200, 30)), "?")).images[0]
    assert torch.equal(wide.pixel_values, tall.pixel_values)
    assert wide.key != tall.key


def test_bad_prompts_are_refused(pairs):
    ours, _ = pairs["tiny"]
    pad = ours.image_token_id
    with pytest.raises(InputError, match="token-id prompt cannot carry images"):
        ours([1, 2, pad, 3])
    with pytest.raises(InputError, match="image placeholder"):
        ours(user("look: <|image_pad|>"))
    assert ours([1, 2, 3]).token_ids == [1, 2, 3]


def test_mismatched_files_are_config_errors(checkpoints, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "broken"
    shutil.copytree(checkpoints["tiny"], path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**config, "merge_size": 3}))
    with pytest.raises(ConfigError, match="spatial_merge_size"):
        Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    model = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**model, "image_token_id": 5}))
    with pytest.raises(ConfigError, match="does not belong to this model"):
        Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
