"""vlmrun with an InternVL model: one-shot with pictures, and a scripted interactive session."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm_plugin_internvl.testing import write_tiny_internvl

PARAMS = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_internvl(tmp_path_factory.mktemp("ivl") / "model", "hf"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("wide", (120, 40)), ("square", (64, 64))):
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths[name] = str(path)
    broken = root / "broken.png"
    broken.write_bytes(Image.open(paths["wide"]).tobytes()[:100])  # not an image file
    paths["broken"] = str(broken)
    return paths


def user(text, *images):
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


def reply(llm, messages) -> str:
    return llm.chat(messages, PARAMS)[0].outputs[0].text


def test_one_shot_with_one_and_two_images(model_dir, llm, pictures, capsys):
    assert main(["--model", model_dir, "--image", pictures["wide"], "--prompt", "Describe.", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == reply(llm, [user("Describe.", pictures["wide"])]) + "\n"
    args = [
        "--model",
        model_dir,
        "-i",
        pictures["wide"],
        "-i",
        pictures["square"],
        "-p",
        "Compare.",
        "--max-tokens",
        "12",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == reply(llm, [user("Compare.", pictures["wide"], pictures["square"])]) + "\n"


def test_one_shot_with_a_broken_image_is_one_line(model_dir, pictures, capsys):
    assert main(["--model", model_dir, "--image", pictures["broken"], "--prompt", "Describe."]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image") and "broken.png" in err and "\n" not in err


def test_scripted_session(model_dir, llm, pictures, capsys, monkeypatch):
    script = (
        "\n".join(
            [
                f"/image {pictures['wide']}",
                "What is this?",
                f"/image {pictures['broken']}",  # a bad picture: reported, the session goes on
                "And now?",
                "/clear",
                f"/image {pictures['square']}",
                "What is this?",
                "/exit",
                "never read",
            ]
        )
        + "\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["--model", model_dir, "--max-tokens", "12"]) == 0
    captured = capsys.readouterr()

    first = [user("What is this?", pictures["wide"])]
    answer1 = reply(llm, first)
    second = first + [{"role": "assistant", "content": answer1}, user("And now?")]
    answer2 = reply(llm, second)
    answer3 = reply(llm, [user("What is this?", pictures["square"])])
    assert captured.out == f"{answer1}\n{answer2}\n{answer3}\n"
    assert "broken.png" in captured.err and "error: image" in captured.err
    assert "history cleared" in captured.err


def test_images_are_encoded_once_across_turns(model_dir, pictures):
    llm = LLM(model_dir)
    calls = []
    original = llm.engine.model.embed_images

    def counting(images):
        calls.append(len(images))
        return original(images)

    llm.engine.model.embed_images = counting
    first = [user("What is this?", pictures["wide"])]
    answer = reply(llm, first)
    reply(llm, first + [{"role": "assistant", "content": answer}, user("And now?")])
    assert calls == [1]
