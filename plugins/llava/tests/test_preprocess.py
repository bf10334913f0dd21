"""LLaVA preprocessing parity: token ids and pixel values equal to transformers' LlavaProcessor /
LlavaNextProcessor (with their PIL image processors), exactly.

Each tiny variant is checked, plus the real models' image settings (llava-1.5: 336-px CLIP crops;
llava-v1.6: 336-px tiles on the five standard grids), written into copies of the tiny
directories (the preprocessor reads only config.json, the tokenizer and the processor files).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import load_model_config
from vlm.errors import ConfigError, InputError
from vlm.testing.conformance import odd_images
from vlm_plugin_llava.preprocess import LlavaPreprocessor, anyres_num_tokens
from vlm_plugin_llava.testing import VARIANTS, load_reference_processor

REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels (the hardest case for resampling parity), converted to ``mode``."""
    rgba = np.random.RandomState(seed).randint(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def transparent_palette() -> Image.Image:
    image = noise(90, 90).quantize(64)
    image.info["transparency"] = 3  # composited onto white like RGBA
    return image


#: the conformance kit's odd sizes and modes (1x1, 17x300, 300x17, RGBA, L, P, CMYK) and more
IMAGES = {
    **dict(odd_images()),
    "1000x50 RGB": noise(1000, 50),
    "800x600 RGB": noise(800, 600),
    "333x250 RGBA": noise(333, 250, "RGBA"),
    "90x90 P with transparency": transparent_palette(),
}


def with_real_settings(tiny: str, out: Path) -> Path:
    """A copy of a tiny directory with the real models' image settings (336-px tower input)."""
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["image_size"] = 336
    image = json.loads((out / "preprocessor_config.json").read_text())
    if "crop_size" in image:
        image["size"], image["crop_size"] = {"shortest_edge": 336}, {"height": 336, "width": 336}
    else:
        image["size"] = {"height": 336, "width": 336}
    if "image_grid_pinpoints" in image:
        image["image_grid_pinpoints"] = config["image_grid_pinpoints"] = REAL_PINPOINTS
    (out / "config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps(image))
    return out


CONFIGS = [*VARIANTS, "llava-clip-llama@336", "llava-next-clip-mistral@336"]


@pytest.fixture(scope="module")
def directories(llava_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava-preprocess")
    dirs = {name: Path(path) for name, path in llava_checkpoints.items()}
    for name in CONFIGS:
        if name.endswith("@336"):
            dirs[name] = with_real_settings(llava_checkpoints[name.removesuffix("@336")], root / name)
    return dirs


def preprocessor_for(path: Path) -> LlavaPreprocessor:
    from transformers import AutoTokenizer

    return LlavaPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)


@pytest.fixture(scope="module")
def preprocessors(directories):
    return {name: preprocessor_for(path) for name, path in directories.items()}


@pytest.fixture(scope="module")
def references(directories):
    return {name: load_reference_processor(path) for name, path in directories.items()}


def user(*parts):
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


def check(ours, reference, messages):
    """vlm's inputs equal the reference processor's, token for token and bit for bit."""
    expected = reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    got = ours(messages)
    assert got.token_ids == expected["input_ids"][0].tolist()
    assert got.image_token_id == reference.image_token_id
    if "pixel_values" not in expected:
        assert got.images == []
        return got
    pixels = expected["pixel_values"]
    for index, image in enumerate(got.images):
        # NeXT pads every image to the batch's largest tile count; the real tiles come first
        want = pixels[index][: len(image.pixel_values)] if pixels.dim() == 5 else pixels[index : index + 1]
        assert image.pixel_values.dtype == want.dtype == torch.float32
        assert torch.equal(image.pixel_values, want)  # bit for bit
        if "image_sizes" in expected:
            assert list(image.extra["original_size"]) == expected["image_sizes"][index].tolist()
            assert not pixels[index][len(image.pixel_values) :].any()  # nothing but padding left over
    assert got.token_ids.count(got.image_token_id) == sum(image.num_tokens for image in got.images)
    return got


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("image", IMAGES)
def test_one_image(preprocessors, references, config, image):
    picture = IMAGES[image]
    got = check(preprocessors[config], references[config], user(picture, "Describe it."))
    (image_input,) = got.images
    assert image_input.extra["original_size"] == (picture.height, picture.width)


@pytest.mark.parametrize("config", CONFIGS)
def test_two_images_and_turns(preprocessors, references, config):
    first, second = noise(800, 600, seed=1), noise(17, 300, "RGBA", seed=2)
    check(preprocessors[config], references[config], user(first, second, "Compare them."))
    conversation = [
        *user("Look:", first),
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        *user(second, "And this one?"),
    ]
    got = check(preprocessors[config], references[config], conversation)
    assert len(got.images) == 2


@pytest.mark.parametrize("config", list(VARIANTS))
def test_text_only(preprocessors, references, config):
    ours, reference = preprocessors[config], references[config]
    check(ours, reference, user("Hello there"))
    got = ours("plain text, <s> and all")
    assert got.token_ids == reference(text="plain text, <s> and all")["input_ids"][0]
    assert got.token_ids[0] == ours.tokenizer.bos_token_id and got.images == []


def test_string_contents_render_as_text_parts(preprocessors):
    """llava-hf's templates iterate over parts; vlm gives them a string content as one text part
    (transformers' processor would render a string content as nothing)."""
    ours = preprocessors["llava-clip-llama"]
    picture = noise(50, 40)
    as_parts = [
        *user(picture, "What?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        *user("Sure?"),
    ]
    as_strings = [
        *user(picture, "What?"),
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    assert ours(as_strings).token_ids == ours(as_parts).token_ids
    assert "A cat." in ours(as_strings).prompt and "Sure?" in ours(as_strings).prompt


def test_a_string_only_template_gets_images_written_into_the_text(directories, tmp_path):
    """A checkpoint whose template reads string contents only (ChatML here): each image becomes
    "<image>\n" before the message's text, as llava-hf's templates place them."""
    from vlm.testing.checkpoints import CHATML_TEMPLATE

    path = tmp_path / "chatml"
    shutil.copytree(directories["llava-clip-llama"], path)
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    ours = preprocessor_for(path)
    got = ours([{"role": "system", "content": "Be brief."}, *user(noise(30, 30), noise(60, 20), "What?")])
    assert got.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\n<image>\nWhat?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert [image.num_tokens for image in got.images] == [9, 9]
    assert got.token_ids.count(got.image_token_id) == 18


def test_image_sources(preprocessors, references, tmp_path):
    """A path, a data URL, a file URL and bytes give what the reference makes of the same image."""
    image = noise(123, 45, seed=3)
    path = tmp_path / "image.png"
    image.save(path)
    ours = preprocessors["llava-next-clip-mistral"]
    expected = check(ours, references["llava-next-clip-mistral"], user(image, "What?"))
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for source in (str(path), data_url, path.read_bytes(), path.as_uri()):
        got = ours(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": source}}, {"type": "text", "text": "What?"}],
                }
            ]
        )
        assert got.token_ids == expected.token_ids
        assert got.images[0].key == expected.images[0].key
        assert torch.equal(got.images[0].pixel_values, expected.images[0].pixel_values)


def test_anyres_key_depends_on_the_original_size(preprocessors):
    """Two pictures that make the same pixels but different token counts must not share a key."""
    ours = preprocessors["llava-next-clip-mistral"]
    a, b = ours(user(Image.new("RGB", (2, 4), "red"), "x")), ours(user(Image.new("RGB", (9, 19), "red"), "x"))
    assert torch.equal(a.images[0].pixel_values, b.images[0].pixel_values)
    assert a.images[0].num_tokens != b.images[0].num_tokens and a.images[0].key != b.images[0].key


# -- the token counts ----------------------------------------------------------------------


def test_anyres_count_equals_transformers_for_many_sizes(references):
    """anyres_num_tokens is LlavaNextProcessor._get_number_of_features, on the real grids."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from vlm_plugin_llava.testing import build_llava_tokenizer

    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=REAL_PINPOINTS, size={"shortest_edge": 336}),
        tokenizer=build_llava_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (336, 336), (672, 336), (1, 5000), (5000, 1), *map(tuple, rng.integers(1, 2000, (300, 2)))]
    for height, width in sizes:
        expected = processor._get_number_of_features(int(height), int(width), 336, 336)
        assert anyres_num_tokens((int(height), int(width)), 336, 14, REAL_PINPOINTS, 1) == expected, (height, width)


def test_anyres_count_equals_the_model_features(llava_checkpoints):
    """The tiny LLaVA-NeXT model makes exactly num_tokens features for pictures of many shapes."""
    from vlm import LLM

    llm = LLM(llava_checkpoints["llava-next-clip-mistral"])
    sizes = [(1, 1), (28, 84), (84, 28), (29, 85), (55, 57), (2, 300), (300, 2), (640, 480), (33, 100)]
    inputs = llm.engine.preprocess(user(*(noise(w, h, seed=i) for i, (w, h) in enumerate(sizes)), "x"))
    with torch.inference_mode():
        features = llm.engine.model.embed_images(inputs.images)
    assert [f.shape[0] for f in features] == [image.num_tokens for image in inputs.images]
    assert len({image.num_tokens for image in inputs.images}) >= 5


# -- errors and configuration ----------------------------------------------------------------


def one_line_error(call, *needles, error=InputError):
    with pytest.raises(error) as exc:
        call()
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_errors(preprocessors):
    ours = preprocessors["llava-clip-llama"]
    image = noise(20, 20)
    one_line_error(lambda: ours("<image> where is the image?"), "1 image placeholder", "0 image")
    one_line_error(lambda: ours(user("look <image>", image)), "2 image placeholder", "1 image")
    one_line_error(lambda: ours([1, 2, ours.image_token_id]), "token-id prompt cannot carry images")
    video = [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "x"}]}]
    one_line_error(lambda: ours(video), "is a video, which this model does not read")
    one_line_error(lambda: ours(3.5), "float")
    assert ours([5, 6, 7]).token_ids == [5, 6, 7]
    # a sliver would be scaled up by its short side: refused before the image processor runs
    one_line_error(lambda: ours(user("what?", noise(2, 401))), "aspect ratio above 200:1")
    assert ours(user("what?", noise(2, 400))).images  # 200:1 is still served


def edited(source: Path, out: Path, config=None, processor=None, image=None) -> Path:
    """A copy of ``source`` with fields of config.json / processor_config.json /
    preprocessor_config.json replaced (a value of None deletes the field)."""
    shutil.copytree(source, out)
    for name, changes in (
        ("config.json", config),
        ("processor_config.json", processor),
        ("preprocessor_config.json", image),
    ):
        if changes:
            data = json.loads((out / name).read_text())
            for key, value in changes.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            (out / name).write_text(json.dumps(data))
    return out


def test_processor_config_variants(directories, references, tmp_path):
    tiny = directories["llava-clip-llama"]
    picture = user(noise(70, 300), "x")
    # transformers 5 nests the image processor in processor_config.json
    nested = tmp_path / "nested"
    shutil.copytree(tiny, nested)
    processor = json.loads((nested / "processor_config.json").read_text())
    processor["image_processor"] = json.loads((nested / "preprocessor_config.json").read_text())
    (nested / "preprocessor_config.json").unlink()
    (nested / "processor_config.json").write_text(json.dumps(processor))
    check(preprocessor_for(nested), references["llava-clip-llama"], picture)
    # older checkpoints leave the token-count fields out: the model's values are used
    bare = edited(
        tiny,
        tmp_path / "bare",
        processor={"patch_size": None, "num_additional_image_tokens": None, "vision_feature_select_strategy": None},
    )
    check(preprocessor_for(bare), references["llava-clip-llama"], picture)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(processor={"patch_size": 16}), "patch_size is 16"),
        (dict(processor={"num_additional_image_tokens": 0}), "num_additional_image_tokens is 0"),
        (dict(processor={"vision_feature_select_strategy": "full"}), "vision_feature_select_strategy is 'full'"),
        (dict(image={"crop_size": {"height": 28, "width": 28}}), "makes 28x28 pictures"),
    ],
)
def test_inconsistent_configs_are_refused(directories, tmp_path, change, needle):
    path = edited(directories["llava-clip-llama"], tmp_path / "edited", **change)
    one_line_error(lambda: preprocessor_for(path), needle, error=ConfigError)


def test_inconsistent_pinpoints_are_refused(directories, tmp_path):
    path = edited(
        directories["llava-next-clip-mistral"], tmp_path / "edited", image={"image_grid_pinpoints": [[28, 56]]}
    )
    one_line_error(lambda: preprocessor_for(path), "image_grid_pinpoints", error=ConfigError)
