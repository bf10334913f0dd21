"""``vlmrun --prompt ... --json``: one JSON object per answer on stdout, so scripts can check the
tokens without the Python API; errors stay one line on stderr with exit status 1."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.cli.main import main

GREEDY = ["--max-tokens", "8", "--temperature", "0"]
FIELDS = {"model", "text", "token_ids", "finish_reason", "usage", "timings"}


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(tiny_qwen2)


def one_answer(stdout: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1 and stdout.endswith("\n"), stdout
    return json.loads(lines[0])


def check_record(record: dict, expected, prompt_tokens: int, model: str) -> None:
    answer = expected.outputs[0]
    assert set(record) == FIELDS
    assert record["model"] == str(Path(model).resolve())
    assert record["text"] == answer.text
    assert record["token_ids"] == answer.token_ids
    assert record["finish_reason"] == answer.finish_reason
    assert record["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.token_ids)}
    timings = record["timings"]
    assert set(timings) == {"ttft_s", "total_s", "tokens_per_s"}
    assert 0 < timings["ttft_s"] <= timings["total_s"]
    assert timings["tokens_per_s"] == pytest.approx(len(answer.token_ids) / timings["total_s"], rel=1e-2)


def test_one_shot_json_has_the_tokens_the_api_gives(tiny_qwen2, llm, capsys):
    messages = [{"role": "user", "content": "Hello"}]
    [expected] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))
    assert main(["--model", tiny_qwen2, "--prompt", "Hello", "--json", *GREEDY]) == 0
    captured = capsys.readouterr()
    record = one_answer(captured.out)
    check_record(record, expected, len(llm.engine.preprocess(messages).token_ids), tiny_qwen2)
    assert record["finish_reason"] == "length"
    # without the chat template: the raw prompt continued
    [raw] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8))
    assert main(["--model", tiny_qwen2, "--prompt", "Hello", "--no-chat-template", "--json", *GREEDY]) == 0
    check_record(one_answer(capsys.readouterr().out), raw, len(raw.prompt_token_ids), tiny_qwen2)


def test_chat_json_prints_one_object_per_answer(tiny_qwen2, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHow are you?\n"))
    assert main(["--model", tiny_qwen2, "--json", *GREEDY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    [expected] = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=8))
    assert first["token_ids"] == expected.outputs[0].token_ids
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "How are you?"},
    ]
    [again] = llm.chat(history, SamplingParams(temperature=0, max_tokens=8))
    assert second["token_ids"] == again.outputs[0].token_ids


def test_json_with_an_image(tmp_path, capsys):
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    model = str(write_tiny_qwen2_vl(tmp_path / "qwen2-vl", "qwen2_vl", seed=1))
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(picture)
    argv = ["--model", model, "--image", str(picture), "--prompt", "What is this?", "--json", *GREEDY]
    assert main(argv) == 0
    record = one_answer(capsys.readouterr().out)
    vl = LLM(model)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(picture)}, {"type": "text", "text": "What is this?"}],
        }
    ]
    [expected] = vl.chat(messages, SamplingParams(temperature=0, max_tokens=8))
    check_record(record, expected, len(vl.engine.preprocess(messages).token_ids), model)
    assert record["usage"]["prompt_tokens"] > 20  # the picture's placeholders are counted
    # with --draw-boxes: the boxes too (a random model writes none), and the picture is saved
    assert main([*argv, "--draw-boxes", str(tmp_path / "boxes.png")]) == 0
    with_boxes = one_answer(capsys.readouterr().out)
    assert with_boxes.pop("boxes") == [] and with_boxes["token_ids"] == record["token_ids"]
    assert (tmp_path / "boxes.png").exists()


def assert_one_line_error(err: str, *named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in named), err


def test_errors_stay_one_line_on_stderr(tiny_qwen2, tmp_path, capsys):
    cases = [
        (["--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--temperature", "-1"], "temperature"),
    ]
    for extra, named in cases:
        assert main(["--model", tiny_qwen2, "--prompt", "Hi", "--json", *GREEDY, *extra]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert_one_line_error(captured.err, named)
    assert main(["--model", str(tmp_path / "nowhere"), "--prompt", "Hi", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "nowhere")


def test_stdout_holds_only_the_json_in_a_fresh_process(tiny_qwen2):
    """Logging set up by the CLI itself (-v) goes to stderr; stdout parses as the one answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", "-v", "--model", tiny_qwen2, "--prompt", "Hi", "--json", *GREEDY],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    record = one_answer(proc.stdout.decode())
    assert len(record["token_ids"]) == record["usage"]["completion_tokens"] > 0
    assert b"INFO vlm: loaded" in proc.stderr
