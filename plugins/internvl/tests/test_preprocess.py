"""InternVL preprocessing parity: token ids and pixel values equal to the references, exactly.

- Hugging Face layout: transformers' ``InternVLProcessor`` + ``GotOcr2ImageProcessorPil``
  (``vlm_plugin_internvl.testing.load_reference_processor``) through ``apply_chat_template``.
- original OpenGVLab layout: OpenGVLab's ``load_image`` / ``dynamic_preprocess`` and the prompt
  ``InternVLChatModel.chat`` builds, re-implemented below without torchvision (their
  ``T.Resize`` of an already tile-sized PIL image is a no-op, ``ToTensor`` is ``x / 255`` in
  float32, ``Normalize`` is ``(x - mean) / std`` in float32).

Each on two configurations: the tiny one (56-px tiles, 1..6 tiles, 4 tokens per tile) and the
real models' values (448-px tiles, patch 14, downsample 0.5, 1..12 tiles, thumbnail: 256 tokens
per tile).
"""

from __future__ import annotations

import base64
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import load_model_config
from vlm.errors import InputError
from vlm_plugin_internvl.preprocess import InternVLPreprocessor, to_rgb
from vlm_plugin_internvl.testing import ORIGINAL_SYSTEM_MESSAGE, load_reference_processor, write_tiny_internvl

CONFIGS = {"tiny": dict(image_size=56, max_patches=6), "448": dict(image_size=448, max_patches=12)}


def noise(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Random pixels: the hardest case for resampling parity."""
    rgba = np.random.RandomState(seed).randint(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "RGBA":
        return image
    if mode == "P":
        return image.convert("RGB").quantize(64)
    if mode == "P+transparency":
        palette = image.convert("RGB").quantize(64)
        palette.info["transparency"] = 3
        return palette
    return image.convert(mode)


IMAGES = {
    "1x1": (1, 1, "RGB"),
    "17x300": (17, 300, "RGB"),
    "1000x50": (1000, 50, "RGB"),
    "448x448": (448, 448, "RGB"),
    "800x600": (800, 600, "RGB"),
    "RGBA-333x250": (333, 250, "RGBA"),
    "L-120x90": (120, 90, "L"),
    "P-64x200": (64, 200, "P"),
    "P-transparent-90x90": (90, 90, "P+transparency"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-preprocess")
    return {
        (name, layout): write_tiny_internvl(root / f"{name}-{layout}", layout=layout, **kwargs)
        for name, kwargs in CONFIGS.items()
        for layout in ("hf", "original")
    }


@pytest.fixture(scope="module")
def preprocessors(checkpoints):
    from transformers import AutoTokenizer

    return {
        key: InternVLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
        for key, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: load_reference_processor(checkpoints[name, "hf"]) for name in CONFIGS}


def user(*parts):
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


def with_part(part: dict, text: str = "What?") -> list[dict]:
    """One user message: an image part as given, then text."""
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def check_hf(ours, reference, messages):
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
    else:
        assert got.images == []
    assert got.token_ids.count(got.image_token_id) == sum(image.num_tokens for image in got.images)
    return got


# -- the OpenGVLab reference, from InternVL's README / modeling_internvl_chat.py --------------


def opengvlab_dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), orig_width * orig_height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    target_width, target_height = image_size * best_ratio[0], image_size * best_ratio[1]
    blocks = best_ratio[0] * best_ratio[1]
    resized_img = image.resize((target_width, target_height))  # PIL's default filter: bicubic
    columns = target_width // image_size
    processed = [
        resized_img.crop(
            (
                (i % columns) * image_size,
                (i // columns) * image_size,
                ((i % columns) + 1) * image_size,
                ((i // columns) + 1) * image_size,
            )
        )
        for i in range(blocks)
    ]
    if use_thumbnail and len(processed) != 1:
        processed.append(image.resize((image_size, image_size)))
    return processed


def opengvlab_load_image(image, config):
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    tiles = opengvlab_dynamic_preprocess(
        image, config.min_dynamic_patch, config.max_dynamic_patch, config.force_image_size, config.use_thumbnail
    )
    tensors = [torch.from_numpy(np.array(tile)).permute(2, 0, 1).float().div(255).sub(mean).div(std) for tile in tiles]
    return torch.stack(tensors)


def opengvlab_chat_ids(tokenizer, question, num_patches_list, num_image_token):
    """InternVLChatModel.chat with the internvl2_5 template: the prompt and its token ids."""
    if num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    query = (
        f"<|im_start|>system\n{ORIGINAL_SYSTEM_MESSAGE}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    for num_patches in num_patches_list:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token * num_patches + "</img>", 1)
    return tokenizer(query)["input_ids"]


def check_original(ours, config, images, question):
    # OpenGVLab converts with .convert("RGB"); vlm composites transparency onto white like
    # transformers (see to_rgb), the only intended difference: feed both the same RGB image
    pixel_values = [opengvlab_load_image(to_rgb(image), config) for image in images]
    image_size, patch = config.force_image_size, config.vision_config.patch_size
    num_image_token = int((image_size // patch) ** 2 * config.downsample_ratio**2)
    # model.chat prefixes a lone image's "<image>\n" itself; several are written by the caller
    written = question if len(images) == 1 else "<image>\n" * len(images) + question
    expected_ids = opengvlab_chat_ids(ours.tokenizer, written, [len(p) for p in pixel_values], num_image_token)
    got = ours(user(*images, question))
    assert got.token_ids == expected_ids
    assert len(got.images) == len(images)
    for image, expected in zip(got.images, pixel_values):
        assert torch.equal(image.pixel_values, expected)
        assert image.num_tokens == len(expected) * num_image_token
    return got


# -- Hugging Face layout ---------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("image", IMAGES)
def test_hf_one_image(preprocessors, references, config, image):
    width, height, mode = IMAGES[image]
    got = check_hf(preprocessors[config, "hf"], references[config], user(noise(width, height, mode), "Describe it."))
    (image_input,) = got.images
    assert image_input.extra["image_size"] == (width, height)


@pytest.mark.parametrize("config", CONFIGS)
def test_hf_two_images_and_turns(preprocessors, references, config):
    first, second = noise(800, 600, "RGB", seed=1), noise(17, 300, "RGBA", seed=2)
    check_hf(preprocessors[config, "hf"], references[config], user(first, second, "Compare them."))
    conversation = [
        {"role": "system", "content": "You are terse."},
        *user("Look:", first),
        {"role": "assistant", "content": "A picture."},
        *user(second, "And this one?"),
    ]
    got = check_hf(preprocessors[config, "hf"], references[config], conversation)
    assert [len(i.pixel_values) for i in got.images] == ([13, 13] if config == "448" else [7, 7])


def test_hf_text_only(preprocessors, references):
    ours, reference = preprocessors["tiny", "hf"], references["tiny"]
    check_hf(ours, reference, [{"role": "user", "content": "Hello there"}])
    check_hf(ours, reference, user("Hello", " there"))
    got = ours("plain <img> text")
    assert got.token_ids == reference(text="plain <img> text")["input_ids"][0]
    assert got.images == []


def test_hf_image_sources(preprocessors, references, tmp_path):
    """A path, a data URL and bytes give what the reference makes of the same (opaque) image."""
    image = noise(123, 45, "RGB", seed=3)
    path = tmp_path / "image.png"
    image.save(path)
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    expected = check_hf(preprocessors["tiny", "hf"], references["tiny"], user(image, "What?"))
    for source in (str(path), data_url, path.read_bytes(), path.as_uri()):
        got = preprocessors["tiny", "hf"](with_part({"type": "image_url", "image_url": {"url": source}}))
        assert got.token_ids == expected.token_ids
        assert got.images[0].key == expected.images[0].key
        assert torch.equal(got.images[0].pixel_values, expected.images[0].pixel_values)
    # the reference loads paths itself, too
    check_hf(preprocessors["tiny", "hf"], references["tiny"], with_part({"type": "image", "path": str(path)}))


# -- original layout -------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("image", IMAGES)
def test_original_one_image(preprocessors, config, image):
    ours = preprocessors[config, "original"]
    check_original(ours, ours.hf_config, [noise(*IMAGES[image])], "Describe it.")


@pytest.mark.parametrize("config", CONFIGS)
def test_original_two_images(preprocessors, config):
    ours = preprocessors[config, "original"]
    check_original(ours, ours.hf_config, [noise(800, 600, "RGB", 1), noise(17, 300, "L", 2)], "Compare them.")


def test_original_text_only(preprocessors):
    ours = preprocessors["tiny", "original"]
    got = ours([{"role": "user", "content": "Hello there"}])
    assert got.token_ids == opengvlab_chat_ids(ours.tokenizer, "Hello there", [], 0)
    assert got.images == [] and got.image_token_id == ours.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("image", IMAGES)
def test_original_layout_matches_the_transformers_processor_pixels(preprocessors, references, config, image):
    """Same settings, same weights: the original layout's pixels are the HF processor's, bit for bit."""
    picture = noise(*IMAGES[image])
    expected = references[config](text="<IMG_CONTEXT>", images=[picture], return_tensors="pt")
    hf = preprocessors[config, "hf"](user(picture, "x"))
    original = preprocessors[config, "original"](user(picture, "x"))
    assert hf.image_token_id == original.image_token_id
    assert hf.images[0].key == original.images[0].key
    assert torch.equal(original.images[0].pixel_values, expected["pixel_values"])


@pytest.mark.parametrize("max_num_tiles", [1, 2, 9])
def test_original_layout_max_num_tiles_is_opengvlab_max_num(checkpoints, max_num_tiles):
    """``--max-num-tiles N`` on the original layout: OpenGVLab's ``load_image(max_num=N)`` (vLLM's
    ``max_dynamic_patch``), pixels and prompt; ``detail: "low"`` is one tile."""
    path = checkpoints["tiny", "original"]
    from transformers import AutoTokenizer

    ours = InternVLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
    ours.set_image_budget(None, None, max_num_tiles=max_num_tiles)
    budget = types.SimpleNamespace(**{**vars(ours.hf_config), "max_dynamic_patch": max_num_tiles})
    for image in ("800x600", "1000x50", "17x300"):
        got = check_original(ours, budget, [noise(*IMAGES[image])], "Describe it.")
        assert len(got.images[0].pixel_values) <= (max_num_tiles + 1 if max_num_tiles > 1 else 1)
    low = ours(with_part({"type": "image", "image": noise(800, 600, "RGB"), "detail": "low"}))
    assert low.images[0].extra["num_tiles"] == 1


def test_original_checkpoint_without_tiling_ignores_tile_budgets(preprocessors):
    """``dynamic_image_size: false``: one tile whatever the budget, as vLLM reads such a checkpoint."""
    import json

    from vlm.config import RawConfig

    original = preprocessors["tiny", "original"]
    data = json.loads((original.model_path / "config.json").read_text())
    fixed = InternVLPreprocessor(
        original.tokenizer, RawConfig({**data, "dynamic_image_size": False}), original.model_path
    )
    fixed.set_image_budget(None, None, max_num_tiles=4)
    for options in ({}, {"detail": "low"}, {"max_num_tiles": 9}):
        got = fixed(with_part({"type": "image", "image": noise(800, 600, "RGB"), **options}))
        assert got.images[0].extra["num_tiles"] == 1


def test_opaque_conversion_is_plain_convert():
    """For images without transparency vlm's RGB conversion is OpenGVLab's .convert('RGB')."""
    for mode in ("L", "P", "CMYK", "RGB", "I"):
        image = noise(31, 17, "RGB", seed=5).convert(mode)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


# -- errors ----------------------------------------------------------------------------------


def one_line_error(call, *needles):
    with pytest.raises(InputError) as exc:
        call()
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_errors(preprocessors, tmp_path):
    hf, original = preprocessors["tiny", "hf"], preprocessors["tiny", "original"]
    image = noise(20, 20, "RGB")
    one_line_error(lambda: hf("<IMG_CONTEXT> where is the image?"), "1 image placeholder", "0 image")
    one_line_error(lambda: hf(user("look <IMG_CONTEXT>", image)), "2 image placeholder", "1 image")
    one_line_error(lambda: original(user("look <image>", image)), "2 image placeholder", "'<image>'")
    one_line_error(lambda: original(user("text with <IMG_CONTEXT>")), "reserved for images")
    missing = str(tmp_path / "missing.jpg")
    one_line_error(lambda: hf(with_part({"type": "image", "path": missing})), "missing.jpg", "no such file")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    one_line_error(
        lambda: hf(with_part({"type": "image", "path": str(broken)})), "broken.jpg", "re-save or re-download"
    )
    remote = {"type": "image", "url": "https://example.com/a.png"}
    one_line_error(lambda: hf(with_part(remote)), "remote image URLs are disabled")
    one_line_error(lambda: hf([1, 2, hf.image_token_id]), "token-id prompt cannot carry images")
    one_line_error(
        lambda: hf(with_part({"type": "video", "video": "v.mp4"})), "is a video, which this model does not read"
    )
    one_line_error(lambda: hf(3.5), "float")


def test_error_for_a_model_without_image_support(preprocessors):
    import json

    from vlm.config import RawConfig

    original = preprocessors["tiny", "original"]
    data = json.loads((original.model_path / "config.json").read_text())
    data.pop("vision_config")
    text_only = InternVLPreprocessor(original.tokenizer, RawConfig(data), original.model_path)
    assert text_only([{"role": "user", "content": "hi"}]).token_ids
    one_line_error(lambda: text_only(user(noise(5, 5, "RGB"), "hi")), "takes no images")


def test_pixel_key_tracks_content(preprocessors):
    hf = preprocessors["tiny", "hf"]
    a, b = noise(40, 30, "RGB", seed=6), noise(40, 30, "RGB", seed=7)
    keys = [hf(user(image, "x")).images[0].key for image in (a, a.copy(), b)]
    assert keys[0] == keys[1] != keys[2]


def test_processor_config_variants(checkpoints, references, tmp_path):
    """transformers 5 nests the image processor in processor_config.json; a wrong
    image_seq_length is a config error, not silently wrong prompts."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from vlm.errors import ConfigError

    path = tmp_path / "nested"
    shutil.copytree(checkpoints["tiny", "hf"], path)
    processor = json.loads((path / "processor_config.json").read_text())
    processor["image_processor"] = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").unlink()
    (path / "processor_config.json").write_text(json.dumps(processor))
    nested = InternVLPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
    check_hf(nested, references["tiny"], user(noise(70, 300, "RGB"), "x"))

    processor["image_seq_length"] = 256
    (path / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ConfigError, match="image_seq_length is 256 but the model makes 4 tokens"):
        InternVLPreprocessor(nested.tokenizer, nested.hf_config, path)
