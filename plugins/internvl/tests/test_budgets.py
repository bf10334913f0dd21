"""InternVL image budgets: tiles per picture, equal to transformers' processor at the same settings.

- ``--max-num-tiles N`` (the engine's budget) and an image part's own ``max_num_tiles`` are
  transformers' ``InternVLProcessor`` (``GotOcr2ImageProcessorPil``) called with
  ``max_patches=N``: same token ids, same pixel values, bit for bit; the original layout is
  OpenGVLab's ``load_image(max_num=N)``.
- ``detail: "low"`` is one tile, transformers' ``crop_to_patches=False`` (= ``max_patches=1``);
  ``high`` / ``auto`` are the engine's budget.
- Pixel budgets (``min_pixels`` / ``max_pixels``) do not apply to InternVL; a part asking for more
  tiles than the engine allows, or a bad ``max_num_tiles``, is a one-line error.
- The original layout's budgets are in ``test_preprocess.py`` (next to OpenGVLab's reference).
- ``LLM(max_num_tiles=...)`` reaches the preprocessor; through the server, ``detail`` and
  ``max_num_tiles`` inside ``image_url`` change the prompt's token count as transformers counts.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.config import load_model_config
from vlm.errors import InputError
from vlm_plugin_internvl.preprocess import LOW_DETAIL_TILES, InternVLPreprocessor
from vlm_plugin_internvl.testing import load_reference_processor, write_tiny_internvl

TOKENS_PER_TILE = 4  # the tiny checkpoints: 56-px tiles, patch 14, downsample 0.5
CHECKPOINT_TILES = 6  # their max_patches / max_dynamic_patch

#: aspect ratios that pick different grids: wide, tall, square, nearly 4:3
SIZES = [(800, 600), (1000, 50), (17, 300), (120, 120), (333, 250)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rgb = np.random.RandomState(seed + width * 7 + height).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-budgets")
    return {layout: write_tiny_internvl(root / layout, layout=layout) for layout in ("hf", "original")}


@pytest.fixture(scope="module")
def reference(checkpoints):
    processor = load_reference_processor(checkpoints["hf"])
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    return processor


def make_preprocessor(path, hf_config=None) -> InternVLPreprocessor:
    from transformers import AutoTokenizer

    return InternVLPreprocessor(
        AutoTokenizer.from_pretrained(path), hf_config or load_model_config(path).hf_config, path
    )


def messages(image: Image.Image, **part_options) -> list[dict]:
    part = {"type": "image", "image": image, **part_options}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}]


def expected(reference, image: Image.Image, **processor_kwargs):
    """transformers' token ids and pixel values for one image with ``processor_kwargs``."""
    out = reference.apply_chat_template(
        messages(image),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )
    return out["input_ids"][0].tolist(), out["pixel_values"]


def check(got, reference_ids, reference_pixels) -> int:
    """Equal to the reference, bit for bit; returns the image's tile count."""
    assert got.token_ids == reference_ids
    (image,) = got.images
    assert torch.equal(image.pixel_values, reference_pixels)
    assert image.num_tokens == len(reference_pixels) * TOKENS_PER_TILE == got.token_ids.count(got.image_token_id)
    return len(reference_pixels)


# -- Hugging Face layout ---------------------------------------------------------------------


@pytest.mark.parametrize("max_num_tiles", [1, 2, 4, 9])  # 9: above the checkpoint's own 6
def test_engine_max_num_tiles_equals_transformers_max_patches(checkpoints, reference, max_num_tiles):
    ours = make_preprocessor(checkpoints["hf"])
    ours.set_image_budget(None, None, max_num_tiles=max_num_tiles)
    counts = []
    for size in SIZES:
        image = picture(*size)
        counts.append(check(ours(messages(image)), *expected(reference, image, max_patches=max_num_tiles)))
    # at most N tiles, plus the thumbnail when there are several
    assert max(counts) <= (max_num_tiles + 1 if max_num_tiles > 1 else 1)
    if max_num_tiles == 9:
        assert max(counts) > CHECKPOINT_TILES + 1  # the engine's flag may raise the checkpoint's limit


def test_detail(checkpoints, reference):
    ours = make_preprocessor(checkpoints["hf"])
    image = picture(800, 600)
    default_ids, default_pixels = expected(reference, image)
    # "low": one tile of the whole picture, what crop_to_patches=False and max_patches=1 both make
    low_ids, low_pixels = expected(reference, image, crop_to_patches=False)
    one_ids, one_pixels = expected(reference, image, max_patches=1)
    assert low_ids == one_ids and torch.equal(low_pixels, one_pixels)
    assert check(ours(messages(image, detail="low")), low_ids, low_pixels) == LOW_DETAIL_TILES
    openai_part = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image), "detail": "low"}}]}
    ]
    assert ours(openai_part).images[0].num_tokens == LOW_DETAIL_TILES * TOKENS_PER_TILE
    # "high" and "auto": the engine's budget (here the checkpoint's)
    for detail in ("high", "auto"):
        assert check(ours(messages(image, detail=detail)), default_ids, default_pixels) == 7  # 2 x 3 grid + thumbnail
    # with an engine budget, "high" follows it and "low" stays one tile
    ours.set_image_budget(None, None, max_num_tiles=4)
    assert (
        check(ours(messages(image, detail="high")), *expected(reference, image, max_patches=4)) == 5
    )  # 2 x 2 + thumbnail
    assert check(ours(messages(image, detail="low")), low_ids, low_pixels) == 1


def test_part_max_num_tiles(checkpoints, reference):
    ours = make_preprocessor(checkpoints["hf"])
    image = picture(1000, 50)
    # a part's own max_num_tiles wins over detail and the engine's budget
    assert check(ours(messages(image, max_num_tiles=3)), *expected(reference, image, max_patches=3)) == 4
    assert check(ours(messages(image, max_num_tiles=3, detail="low")), *expected(reference, image, max_patches=3)) == 4
    ours.set_image_budget(None, None, max_num_tiles=4)
    assert check(ours(messages(image, max_num_tiles=2)), *expected(reference, image, max_patches=2)) == 3
    # pixel budgets are Qwen2-VL's: InternVL's processor has none, they change nothing
    plain = ours(messages(image))
    assert ours(messages(image, max_pixels=28 * 28, min_pixels=28 * 28)).token_ids == plain.token_ids
    ours.set_image_budget(28 * 28, 28 * 28 * 4, max_num_tiles=4)
    assert ours(messages(image)).token_ids == plain.token_ids


def test_two_images_with_their_own_budgets(checkpoints, reference):
    ours = make_preprocessor(checkpoints["hf"])
    first, second = picture(800, 600), picture(17, 300)
    content = [
        {"type": "image", "image": first, "detail": "low"},
        {"type": "image", "image": second, "max_num_tiles": 2},
        {"type": "text", "text": "Compare."},
    ]
    got = ours([{"role": "user", "content": content}])
    wanted = [expected(reference, first, max_patches=1)[1], expected(reference, second, max_patches=2)[1]]
    assert [len(p) for p in wanted] == [1, 3]  # one tile; a 1 x 2 grid and the thumbnail
    for image, pixels in zip(got.images, wanted):
        assert torch.equal(image.pixel_values, pixels)
    assert got.token_ids.count(got.image_token_id) == sum(len(p) for p in wanted) * TOKENS_PER_TILE


def test_candidate_grids_are_transformers_in_its_order():
    """The grid search visits only grids within the budget (a large --max-num-tiles stays cheap),
    in transformers' order, so ties resolve the same way."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_all_supported_aspect_ratios

    from vlm_plugin_internvl.preprocess import _candidate_grids

    for min_tiles in (1, 2, 5):
        for max_tiles in range(1, 41):
            assert list(_candidate_grids(min_tiles, max_tiles)) == get_all_supported_aspect_ratios(min_tiles, max_tiles)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_num_tiles": 0}, "message 0 part 0: max_num_tiles must be a positive whole number of tiles"),
        ({"max_num_tiles": "4"}, "max_num_tiles must be a positive whole number"),
        ({"max_num_tiles": True}, "max_num_tiles must be a positive whole number"),
        ({"max_num_tiles": 7}, "asks for max_num_tiles 7, but this engine allows at most 6 tiles per image"),
    ],
)
def test_bad_max_num_tiles_are_one_line_errors(checkpoints, options, message):
    ours = make_preprocessor(checkpoints["hf"])
    with pytest.raises(InputError) as info:
        ours(messages(picture(40, 40), **options))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_part_may_not_exceed_the_engine_budget(checkpoints):
    ours = make_preprocessor(checkpoints["hf"])
    ours.set_image_budget(None, None, max_num_tiles=3)
    with pytest.raises(InputError, match="at most 3 tiles per image; ask for 3 or fewer"):
        ours(messages(picture(40, 40), max_num_tiles=4))


# -- through the engine and the server -------------------------------------------------------


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_llm_takes_the_engine_budget(checkpoints, reference):
    from vlm import LLM

    image = picture(800, 600)
    llm = LLM(str(checkpoints["hf"]), max_num_tiles=4)
    got = llm.engine.inputs.preprocessor(messages(image))
    assert check(got, *expected(reference, image, max_patches=4)) == 5  # 2 x 2 + thumbnail (the checkpoint: 7)


def test_server_detail_and_max_num_tiles(checkpoints, reference, tmp_path):
    openai = pytest.importorskip("openai")
    from vlm.testing.server import ServerProcess

    proc = ServerProcess(
        str(checkpoints["hf"]), "--served-model-name", "tiny", "--max-num-tiles", "4", log_path=tmp_path / "log"
    )
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=120)
        image = picture(1000, 50)  # tiles: 7 (checkpoint), 5 (engine: 4), 3 (a part's 2), 1 (low)
        url = data_url(image)

        def prompt_tokens(image_url: dict) -> int:
            content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "What?"}]
            response = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0
            )
            return response.usage.prompt_tokens

        def reference_tokens(**kwargs) -> int:
            ids, _ = expected(reference, image, **kwargs)
            return len(ids)

        engine, part, low = (
            reference_tokens(max_patches=4),
            reference_tokens(max_patches=2),
            reference_tokens(crop_to_patches=False),
        )
        assert engine - part == part - low == 2 * TOKENS_PER_TILE  # 5, 3 and 1 tiles
        assert prompt_tokens({"url": url}) == prompt_tokens({"url": url, "detail": "auto"}) == engine
        assert prompt_tokens({"url": url, "detail": "low"}) == low
        assert prompt_tokens({"url": url, "max_num_tiles": 2}) == part
        with pytest.raises(openai.BadRequestError) as info:
            prompt_tokens({"url": url, "max_num_tiles": 5})
        assert "at most 4 tiles per image" in str(info.value)
        assert prompt_tokens({"url": url, "detail": "high"}) == engine  # and it keeps serving
    finally:
        proc.stop()
