"""``vlmrun --video``: a video file on the command line equals the Python API's video part.

With a tiny Qwen2-VL, ``vlmrun --model DIR --video clip.mp4 --prompt ... --json`` gives the same
greedy token ids as ``LLM.chat`` with ``{"type": "video", "video": path}``, alone and after a
picture; a chat's ``/video PATH`` attaches one to the next message, with the same answer. A remote
URL without ``--allow-remote-media`` and a missing file are one ``error:`` line before the model
loads; a text-only model and a LLaVA model (no video) refuse the video with the engine's one line.
Decoding the clip needs PyAV (``pip install av``); the tests skip without it.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main
from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

pytest.importorskip("av")

MAX_TOKENS = 6
GREEDY = ["--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--device", "cpu", "--dtype", "float32"]


def write_clip(path: Path, count: int = 9, fps: int = 4, size: tuple[int, int] = (64, 48)) -> Path:
    """An MPEG-4 clip of random pixels (lossy, but it decodes the same way every time)."""
    import av

    width, height = size
    rng = np.random.default_rng(5)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(count):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("media")
    picture = root / "picture.png"
    pixels = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(picture)
    return {"clip": str(write_clip(root / "clip.mp4")), "picture": str(picture)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl-video-cli") / "model"))


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, device="cpu", dtype="float32")


def api_token_ids(llm: LLM, content: list[dict]) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    output = llm.chat([{"role": "user", "content": content}], params)[0].outputs[0]
    assert output.finish_reason in ("length", "stop")
    return list(output.token_ids)


def json_records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_shot_video_equals_python_api(model_dir, llm, media, capsys):
    expected = api_token_ids(
        llm, [{"type": "video", "video": media["clip"]}, {"type": "text", "text": "What happens?"}]
    )
    assert main(["--model", model_dir, "--video", media["clip"], "--prompt", "What happens?", "--json", *GREEDY]) == 0
    (record,) = json_records(capsys.readouterr().out)
    assert record["token_ids"] == expected and len(expected) >= 1

    # a picture and a video: the picture's part first, then the video's, then the text
    expected = api_token_ids(
        llm,
        [
            {"type": "image", "image": media["picture"]},
            {"type": "video", "video": media["clip"]},
            {"type": "text", "text": "Compare."},
        ],
    )
    args = ["--model", model_dir, "-i", media["picture"], "--video", media["clip"], "-p", "Compare.", "--json"]
    assert main([*args, *GREEDY]) == 0
    (record,) = json_records(capsys.readouterr().out)
    assert record["token_ids"] == expected


def test_chat_video_command_attaches_to_the_next_message(model_dir, llm, media, capsys, monkeypatch):
    expected = api_token_ids(
        llm, [{"type": "video", "video": media["clip"]}, {"type": "text", "text": "What happens?"}]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video\n/video {media['clip']}\nWhat happens?\n"))
    assert main(["--model", model_dir, "--json", *GREEDY]) == 0
    captured = capsys.readouterr()
    (record,) = json_records(captured.out)
    assert record["token_ids"] == expected
    assert "usage: /video PATH" in captured.err
    assert f"(attached {media['clip']}; it goes with your next message)" in captured.err


def test_bad_video_arguments_fail_before_the_model_loads(tmp_path, capsys):
    # no model exists at this path: each error must come before loading it
    missing_model = str(tmp_path / "no-model")
    status = main(["--model", missing_model, "--video", "https://example.com/clip.mp4", "-p", "Hi"])
    err = capsys.readouterr().err.strip()
    assert status != 0 and len(err.splitlines()) == 1
    assert (
        err.startswith("error: video 'https://example.com/clip.mp4': remote video URLs")
        and "--allow-remote-media" in err
    )

    status = main(["--model", missing_model, "--video", "clip.mp4", "--no-chat-template", "-p", "Hi"])
    assert status != 0
    assert capsys.readouterr().err.strip() == (
        "error: --video needs the chat template (its video part); drop --no-chat-template"
    )


def test_missing_video_file_is_one_line(model_dir, tmp_path, capsys):
    missing = str(tmp_path / "absent.mp4")
    assert main(["--model", model_dir, "--video", missing, "-p", "Hi", *GREEDY]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: video ") and "absent.mp4" in line


@pytest.mark.parametrize("family", ["text-only", "llava"])
def test_a_model_without_video_refuses_it_in_one_line(family, media, tmp_path, capsys):
    if family == "text-only":
        from vlm.testing.checkpoints import write_tiny_text_model

        model = write_tiny_text_model(tmp_path / "model")
    else:
        llava_testing = pytest.importorskip("vlm_plugin_llava.testing")
        model = llava_testing.write_tiny_llava(tmp_path / "model")
    capsys.readouterr()  # the writer's progress bars
    status = main(["--model", str(model), "--video", media["clip"], "-p", "What happens?", *GREEDY])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: message 0 part 0 is a video, which this model does not read")
