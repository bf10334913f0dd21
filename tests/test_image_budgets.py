"""Image budgets: ``--min-pixels`` / ``--max-pixels`` (engine), an image part's own ``min_pixels`` /
``max_pixels``, and OpenAI's ``detail``; for Qwen2-VL each equals transformers' image processor
built with the same budget (pixels, grid, token count), ``detail: "low"`` is at most
``LOW_DETAIL_MAX_PIXELS``; families without a budget (LLaVA-1.5, LLaVA-NeXT) ignore ``detail``
and every budget; through the server, the prompt's token count follows the budget. InternVL's
tile budget (``--max-num-tiles``, ``max_num_tiles``, ``detail``) is tested against transformers'
processor in ``plugins/internvl/tests/test_budgets.py``."""

from __future__ import annotations

import base64
import io

import pytest
import torch

pytest.importorskip("vlm_plugin_qwen2vl")

from vlm.errors import ConfigError, InputError  # noqa: E402
from vlm.inputs.preprocessor import ImageBudget  # noqa: E402

# the model's own budget: 4 to 100 merged tokens
MODEL_MIN, MODEL_MAX = 28 * 28 * 4, 28 * 28 * 100


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"), min_pixels=MODEL_MIN, max_pixels=MODEL_MAX))


@pytest.fixture(scope="module")
def preprocessor(qwen_dir):
    from transformers import AutoConfig, AutoTokenizer

    from vlm_plugin_qwen2vl.preprocess import Qwen2VLPreprocessor

    return Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(qwen_dir), AutoConfig.from_pretrained(qwen_dir), qwen_dir)


def _picture(width: int, height: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(image, min_pixels: int, max_pixels: int):
    """transformers' Qwen2-VL image processor with this budget: (pixel_values, grid, tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=[image], return_tensors="pt")
    grid = tuple(int(v) for v in out["image_grid_thw"][0])
    return out["pixel_values"], grid, grid[0] * grid[1] * grid[2] // 4


@pytest.mark.parametrize(
    "size, budget",
    [
        ((300, 200), (28 * 28 * 4, 28 * 28 * 16)),  # shrunk to a small budget
        ((90, 60), (28 * 28 * 40, 28 * 28 * 200)),  # enlarged to a large minimum
        ((500, 137), (3136, 401408)),  # Qwen's own defaults (as vlmrun --max-pixels 401408)
        ((640, 480), (28 * 28, 28 * 28 * 6)),
    ],
)
def test_budgets_equal_transformers_processor(preprocessor, size, budget):
    image = _picture(*size)
    ours = preprocessor.preprocess_image_within(image, ImageBudget(*budget))
    pixel_values, grid, tokens = _reference(image, *budget)
    assert ours.extra["image_grid_thw"] == grid
    assert ours.num_tokens == tokens
    torch.testing.assert_close(ours.pixel_values, pixel_values, rtol=0, atol=1e-6)


def _messages(image, **part_options):
    return [
        {"role": "user", "content": [{"type": "image", "image": image, **part_options}, {"type": "text", "text": "hi"}]}
    ]


def _image_tokens(preprocessor, messages) -> int:
    inputs = preprocessor(messages)
    return inputs.token_ids.count(preprocessor.image_token_id)


def test_engine_budget_part_budget_and_detail(qwen_dir):
    from transformers import AutoConfig, AutoTokenizer

    from vlm_plugin_qwen2vl.preprocess import LOW_DETAIL_MAX_PIXELS, Qwen2VLPreprocessor

    pre = Qwen2VLPreprocessor(AutoTokenizer.from_pretrained(qwen_dir), AutoConfig.from_pretrained(qwen_dir), qwen_dir)
    image = _picture(400, 300)
    model_tokens = _reference(image, MODEL_MIN, MODEL_MAX)[2]
    low_tokens = _reference(image, MODEL_MIN, LOW_DETAIL_MAX_PIXELS)[2]
    assert low_tokens < model_tokens  # the test means something
    assert _image_tokens(pre, _messages(image)) == model_tokens
    assert _image_tokens(pre, _messages(image, detail="auto")) == model_tokens
    assert _image_tokens(pre, _messages(image, detail="high")) == model_tokens
    assert _image_tokens(pre, _messages(image, detail="low")) == low_tokens <= 64
    # OpenAI's shape: detail inside image_url
    data_url = _data_url(image)
    openai_part = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url, "detail": "low"}}]}
    ]
    assert _image_tokens(pre, openai_part) == low_tokens
    # a part's own budget (qwen-vl-utils' keys) wins over detail and the engine's
    assert _image_tokens(pre, _messages(image, max_pixels=28 * 28 * 9)) == _reference(image, MODEL_MIN, 28 * 28 * 9)[2]
    # the engine's budget (--max-pixels): every image, and "low" stays within it
    pre.set_image_budget(None, 28 * 28 * 20)
    engine_tokens = _reference(image, MODEL_MIN, 28 * 28 * 20)[2]
    assert _image_tokens(pre, _messages(image)) == engine_tokens
    assert _image_tokens(pre, _messages(image, detail="high")) == engine_tokens
    assert _image_tokens(pre, _messages(image, detail="low")) == engine_tokens  # 20 tokens < the low budget's 64
    pre.set_image_budget(28 * 28 * 30, None)  # --min-pixels: small pictures get more tokens
    small = _picture(60, 40)
    assert _image_tokens(pre, _messages(small)) == _reference(small, 28 * 28 * 30, MODEL_MAX)[2]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"detail": "medium"}, "detail must be 'low', 'high' or 'auto'"),
        ({"max_pixels": 0}, "max_pixels must be a positive number of pixels"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels (5000) exceeds max_pixels (4000)"),
    ],
)
def test_bad_part_budgets_are_one_line_errors(preprocessor, options, message):
    with pytest.raises(InputError) as info:
        preprocessor(_messages(_picture(40, 40), **options))
    assert message in str(info.value) and str(info.value).startswith("message 0 part 0") and "\n" not in str(info.value)


@pytest.mark.parametrize("variant", ["llava-clip-llama", "llava-next-clip-mistral"])
def test_a_family_without_budgets_ignores_detail(tmp_path, variant):
    """LLaVA-1.5 (fixed 336-px input) and LLaVA-NeXT (anyres: the grid comes from config.json's
    ``image_grid_pinpoints``, which the model's unpadding reads too, so the processor has no knob
    to turn alone) make the same tokens whatever the budget."""
    pytest.importorskip("vlm_plugin_llava")
    from transformers import AutoConfig, AutoTokenizer

    from vlm_plugin_llava.preprocess import LlavaPreprocessor
    from vlm_plugin_llava.testing import write_tiny_llava

    path = str(write_tiny_llava(tmp_path / "llava", variant=variant))
    pre = LlavaPreprocessor(AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path), path)
    image = _picture(64, 48)
    plain = pre(_messages(image))
    assert pre.low_detail_budget is None
    for options in ({"detail": "low"}, {"detail": "high"}, {"max_pixels": 28 * 28}, {"max_num_tiles": 1}):
        assert pre(_messages(image, **options)).token_ids == plain.token_ids
    pre.set_image_budget(28 * 28, 28 * 28 * 4, max_num_tiles=1)  # --min-pixels / --max-pixels / --max-num-tiles
    assert pre(_messages(image)).token_ids == plain.token_ids


def test_cogvlm_has_a_fixed_cost(tmp_path):
    """CogVLM resizes every picture to its one input size: (S / 14 / 2)^2 + 2 tokens on CogVLM2
    (boi, the merged patches, eoi), whatever the budget (its preprocessor has none to set)."""
    pytest.importorskip("vlm_plugin_cogvlm")
    from transformers import AutoTokenizer

    from vlm.config import load_model_config
    from vlm.inputs.preprocessor import apply_image_budget
    from vlm_plugin_cogvlm.preprocess import CogVLMPreprocessor
    from vlm_plugin_cogvlm.testing import write_tiny_cogvlm

    path = write_tiny_cogvlm(tmp_path / "cogvlm", variant="cogvlm2")
    pre = CogVLMPreprocessor(AutoTokenizer.from_pretrained(path), load_model_config(path).hf_config, path)
    apply_image_budget(pre, 28 * 28, 28 * 28 * 4, max_num_tiles=1)  # nothing to set: a no-op
    side = pre.settings.image_size // pre.settings.patch_size // 2
    for size in ((40, 30), (500, 90)):
        plain = pre(_messages(_picture(*size)))
        assert plain.images[0].num_tokens == side * side + 2 == plain.token_ids.count(pre.image_token_id)
        for options in ({"detail": "low"}, {"max_pixels": 28 * 28}, {"max_num_tiles": 1}):
            assert pre(_messages(_picture(*size), **options)).token_ids == plain.token_ids


def test_qwen2_vl_ignores_tile_budgets(preprocessor):
    """Qwen2-VL has no tiles: ``max_num_tiles`` changes nothing (its budget is pixels)."""
    image = _picture(400, 300)
    assert _image_tokens(preprocessor, _messages(image, max_num_tiles=1)) == _reference(image, MODEL_MIN, MODEL_MAX)[2]


def test_budgets_combine_field_by_field():
    part = ImageBudget(max_num_tiles=2)
    engine = ImageBudget(min_pixels=10, max_pixels=20, max_num_tiles=6)
    assert part.over(engine) == ImageBudget(10, 20, 2)
    assert ImageBudget().over(engine) == engine


def test_apply_image_budget_keeps_third_party_preprocessors_working():
    """A plugin's own ``set_image_budget(min_pixels, max_pixels)`` (written before tile budgets)
    still gets pixel budgets and is never handed ``max_num_tiles``; core's takes all three."""
    from vlm.inputs.preprocessor import apply_image_budget

    class PixelsOnly:
        def set_image_budget(self, min_pixels, max_pixels):
            self.budget = (min_pixels, max_pixels)

    pre = PixelsOnly()
    apply_image_budget(pre, None, None)
    assert not hasattr(pre, "budget")
    apply_image_budget(pre, None, 4096)
    assert pre.budget == (None, 4096)
    apply_image_budget(pre, 1024, None, max_num_tiles=4)
    assert pre.budget == (1024, None)

    class WithTiles(PixelsOnly):
        def set_image_budget(self, min_pixels, max_pixels, max_num_tiles=None):
            self.budget = (min_pixels, max_pixels, max_num_tiles)

    tiled = WithTiles()
    apply_image_budget(tiled, None, None, max_num_tiles=4)
    assert tiled.budget == (None, None, 4)


def test_engine_flags_and_config():
    import argparse

    from vlm.cli.engine_args import add_engine_arguments, engine_settings
    from vlm.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    settings = engine_settings(parser.parse_args(["--min-pixels", "3136", "--max-pixels", "401408"]))
    assert settings == {"min_pixels": 3136, "max_pixels": 401408}
    assert EngineConfig(model="m", **settings).max_pixels == 401408
    with pytest.raises(ConfigError, match=r"--min-pixels \(9\) exceeds --max-pixels \(4\)"):
        EngineConfig(model="m", min_pixels=9, max_pixels=4)
    with pytest.raises(ConfigError, match="--max-pixels"):
        EngineConfig(model="m", max_pixels=0)
    tiles = engine_settings(parser.parse_args(["--max-num-tiles", "4"]))
    assert tiles == {"max_num_tiles": 4} and EngineConfig(model="m", **tiles).max_num_tiles == 4
    assert EngineConfig(model="m").max_num_tiles is None  # the checkpoint's own max_patches
    with pytest.raises(ConfigError, match="--max-num-tiles"):
        EngineConfig(model="m", max_num_tiles=0)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_server_budget_and_detail(qwen_dir, tmp_path):
    openai = pytest.importorskip("openai")
    from vlm.testing.server import ServerProcess

    proc = ServerProcess(
        qwen_dir, "--served-model-name", "tiny", "--max-pixels", str(28 * 28 * 20), log_path=tmp_path / "log"
    )
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=120)
        image = _picture(400, 300)

        def prompt_tokens(image_url: dict) -> int:
            content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "hi"}]
            response = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0
            )
            return response.usage.prompt_tokens

        url = _data_url(image)
        engine = prompt_tokens({"url": url})
        assert prompt_tokens({"url": url, "detail": "high"}) == engine
        smaller = prompt_tokens({"url": url, "detail": "low", "max_pixels": 28 * 28 * 6})
        expected = _reference(image, MODEL_MIN, 28 * 28 * 20)[2] - _reference(image, MODEL_MIN, 28 * 28 * 6)[2]
        assert engine - smaller == expected > 0
        with pytest.raises(openai.BadRequestError) as info:
            prompt_tokens({"url": url, "max_pixels": -1})
        assert info.value.body["param"] == "messages[0].content[0]"
    finally:
        proc.stop()


def test_llm_and_cli_take_the_engine_budget(qwen_dir, tmp_path):
    """``LLM(max_pixels=...)`` and ``vlmrun --max-pixels`` reach the preprocessor (not only the server's)."""
    import contextlib
    import json

    from vlm import LLM
    from vlm.cli.main import main

    image = _picture(400, 300)
    budget = 28 * 28 * 20
    llm = LLM(qwen_dir, max_pixels=budget)
    assert _image_tokens(llm.engine.inputs.preprocessor, _messages(image)) == _reference(image, MODEL_MIN, budget)[2]
    path = tmp_path / "picture.png"
    image.save(path)
    args = ["--model", qwen_dir, "--image", str(path), "--prompt", "hi", "--max-tokens", "1", "--json"]
    outputs = []
    for extra in ([], ["--max-pixels", str(budget)]):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(args + extra) == 0
        outputs.append(json.loads(buffer.getvalue().strip().splitlines()[-1]))
    assert outputs[1]["usage"]["prompt_tokens"] < outputs[0]["usage"]["prompt_tokens"]


def test_a_request_cannot_raise_a_pictures_cost_past_the_servers_limit(preprocessor):
    """A part's own ``min_pixels`` / ``max_pixels`` may lower the cost, never exceed ``--max-pixels``
    (else the model's own maximum): ``min_pixels=10**11`` would resize a small picture into gigabytes."""
    image = _picture(300, 200)
    with pytest.raises(InputError, match=f"image min_pixels 100000000000 exceeds the server's limit of {MODEL_MAX}"):
        preprocessor(_messages(image, min_pixels=10**11, max_pixels=10**11))
    with pytest.raises(InputError, match=f"image max_pixels {MODEL_MAX + 1} exceeds"):
        preprocessor(_messages(image, max_pixels=MODEL_MAX + 1))
    assert _image_tokens(preprocessor, _messages(image, max_pixels=MODEL_MAX)) > 0
    preprocessor.set_image_budget(None, 28 * 28 * 20)
    try:
        with pytest.raises(InputError, match="exceeds the server's limit of 15680"):
            preprocessor(_messages(image, max_pixels=28 * 28 * 21))
    finally:
        preprocessor.set_image_budget(None, None)
