"""The fallback through ``vlmrun`` and ``vlmrun serve``: answers equal transformers' greedy
output, and a family it refuses (Mllama's cross-attention image path) is one line on the command
line and a 400 from the server."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch

from vlm.cli.main import main
from vlm.testing.server import ServerProcess
from vlm_plugin_transformers import testing

from .conftest import transformers_generate

TOKENS = 12
#: one thread, as the in-process tests run (conftest.one_thread)
SERVER_ARGS = ("--threads", "1")


@pytest.fixture(scope="module")
def mllama(tmp_path_factory) -> str:
    return str(testing.write_tiny_mllama(tmp_path_factory.mktemp("mllama") / "mllama"))


def reference_text(model_dir: str, messages, picture, stop_at_eos: bool) -> str:
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    [(tokens, _, _)] = transformers_generate(model_dir, [{"text": text, "images": [picture]}])
    tokens = tokens[:TOKENS]
    eos = AutoConfig.from_pretrained(model_dir).eos_token_id
    if stop_at_eos and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return processor.tokenizer.decode(tokens, skip_special_tokens=True)


def chat(text, picture):
    return [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": text}]}]


def test_vlmrun_answers_as_transformers(checkpoint, pictures, tmp_path, capsys):
    """Idefics3 (no dedicated plugin) one-shot with a picture that is split into tiles."""
    model_dir = checkpoint("idefics3")
    path = tmp_path / "picture.png"
    pictures[1].save(path)
    args = ["--model", model_dir, "--image", str(path), "--prompt", "Describe this."]
    assert main([*args, "--temperature", "0", "--max-tokens", str(TOKENS)]) == 0
    expected = reference_text(model_dir, chat("Describe this.", pictures[1]), pictures[1], stop_at_eos=True)
    assert capsys.readouterr().out == expected + "\n"


def data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_server_answers_as_transformers(checkpoint, pictures, tmp_path):
    """Gemma 3 (bidirectional image tokens, sliding-window layers) through the OpenAI API."""
    model_dir = checkpoint("gemma3")
    server = ServerProcess(model_dir, "--dtype", "float32", *SERVER_ARGS, log_path=tmp_path / "server.log")
    try:
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(pictures[0])}},
                        {"type": "text", "text": "Describe this."},
                    ],
                }
            ],
            "temperature": 0,
            "max_tokens": TOKENS,
            "ignore_eos": True,
        }
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert answer == reference_text(model_dir, chat("Describe this.", pictures[0]), pictures[0], stop_at_eos=False)


def test_which_names_the_fallback(checkpoint, capsys):
    """No first-party plugin claims Idefics3: the fallback's low-priority claim is the one chosen."""
    model_dir = checkpoint("idefics3")
    assert main(["which", "--model", model_dir]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "plugin: transformers (highest-priority claim)" in out
    assert " * transformers (priority -100): fallback: Idefics3ForConditionalGeneration" in out
    assert [line for line in out if line.startswith(("  ", " *")) and "priority" in line] == [out[-1]]


def test_refused_family_on_the_command_line(mllama, pictures, tmp_path, capsys):
    path = tmp_path / "picture.png"
    pictures[2].save(path)
    assert main(["--model", mllama, "--image", str(path), "--prompt", "Describe.", "--max-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: mllama (MllamaForConditionalGeneration) reads images through cross-attention")


def test_refused_family_through_the_server(mllama, pictures, tmp_path):
    server = ServerProcess(mllama, *SERVER_ARGS, log_path=tmp_path / "server.log")
    try:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(pictures[2])}},
            {"type": "text", "text": "Describe."},
        ]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        text_only = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
            timeout=60,
        )
    finally:
        server.stop()
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "mllama (MllamaForConditionalGeneration) reads images through cross-attention" in message
    assert "\n" not in message
    assert text_only.status_code == 200  # its text path is not refused


def test_refused_architecture_at_load(tmp_path):
    """A config the engine cannot page at all is refused before anything is built."""
    from transformers import AutoConfig

    from vlm.errors import ConfigError
    from vlm_plugin_transformers.families import check_supported

    config = AutoConfig.for_model("gemma2", attn_logit_softcapping=50.0)
    with pytest.raises(ConfigError, match=r"gemma2 \(Gemma2ForCausalLM\) soft-caps its attention logits"):
        check_supported(config)
    assert torch  # torch is loaded anyway by the fixtures' checkpoints
