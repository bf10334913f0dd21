"""vlmrun with LLaVA models: one-shot with pictures prints what the Python API answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm_plugin_llava.testing import VARIANTS

PARAMS = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("wide", (120, 40)), ("tall", (30, 90))):
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths[name] = str(path)
    return paths


def user(text, *images):
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


def api_answer(model_dir: str, messages) -> str:
    answer = LLM(model_dir).chat(messages, PARAMS)[0].outputs[0]
    assert len(answer.token_ids) == 8
    return answer.text


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_shot_prints_the_api_answer(llava_checkpoints, pictures, capsys, variant):
    model_dir = llava_checkpoints[variant]
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
    assert capsys.readouterr().out == api_answer(model_dir, [user("Describe.", pictures["wide"])]) + "\n"
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
    assert (
        capsys.readouterr().out == api_answer(model_dir, [user("Compare.", pictures["wide"], pictures["tall"])]) + "\n"
    )


def test_vlmrun_console_script(llava_checkpoints, pictures):
    """The installed `vlmrun` entry point, in a fresh process, for LLaVA-NeXT."""
    vlmrun = shutil.which("vlmrun", path=str(Path(sys.executable).parent))
    assert vlmrun, "vlmrun is not installed next to this interpreter"
    model_dir = llava_checkpoints["llava-next-clip-mistral"]
    result = subprocess.run(
        [
            vlmrun,
            "--model",
            model_dir,
            "--image",
            pictures["tall"],
            "--prompt",
            "What is it?",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == api_answer(model_dir, [user("What is it?", pictures["tall"])]) + "\n"


def test_text_prompt_uses_a_template_that_only_the_processor_files_carry(llava_checkpoints, tmp_path, capsys):
    """Older llava-hf repos ship the chat template only in chat_template.json: a text-only
    ``--prompt`` must still be rendered with it, not sent as raw text."""
    import json

    model_dir = tmp_path / "template-in-json"
    shutil.copytree(llava_checkpoints["llava-clip-llama"], model_dir)
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text()
    jinja.unlink()
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    llm = LLM(str(model_dir))
    assert not llm.tokenizer.chat_template and llm.engine.preprocessor.chat_template == template
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    expected = llm.chat(messages, PARAMS)[0].outputs[0].text
    raw = llm.generate(["Hello there"], PARAMS)[0].outputs[0].text
    assert expected != raw
    assert main(["--model", str(model_dir), "--prompt", "Hello there", "--temperature", "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
