"""vlmrun with a Qwen2-VL model: one-shot with pictures equals the Python API."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl-cli") / "model", "qwen2_5_vl"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("wide", (120, 40)), ("tall", (50, 90))):
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths[name] = str(path)
    return paths


def test_one_shot_equals_python_api(model_dir, pictures, capsys):
    llm = LLM(model_dir)
    params = SamplingParams(temperature=0, max_tokens=8)

    def reply(text, *images):
        content = [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]
        return llm.chat([{"role": "user", "content": content}], params)[0].outputs[0].text

    args = [
        "--model",
        model_dir,
        "--image",
        pictures["wide"],
        "--prompt",
        "Describe.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    assert main(args) == 0
    expected = reply("Describe.", pictures["wide"])
    assert expected and capsys.readouterr().out == expected + "\n"
    args = [
        "--model",
        model_dir,
        "-i",
        pictures["wide"],
        "-i",
        pictures["tall"],
        "-p",
        "Compare.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == reply("Compare.", pictures["wide"], pictures["tall"]) + "\n"


def test_which_names_the_plugin(model_dir, capsys):
    assert main(["which", "--model", model_dir]) == 0
    assert "qwen2vl" in capsys.readouterr().out
