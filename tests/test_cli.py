"""``vlmrun``: plugins, which, check, one-shot generation, interactive chat, and its errors.

Commands run in-process through ``vlm.cli.main.main`` (a subprocess pays for importing torch);
only what needs a fresh interpreter (stdout/stderr of real logging) runs in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.cli.main import main
from vlm.plugin import manager as plugins
from vlm.plugin.manager import reset_registry

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
RIVAL = FIXTURES / "vlmtest_rival_qwen2.py"
LLAMA_ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "InternLM2ForCausalLM"]
LLAMA_HOOKS = ["architectures", "build_model", "build_preprocessor", "match"]
VLM_ENV = (plugins.LOAD_PLUGINS_ENV, plugins.PLUGIN_FILES_ENV, plugins.TRACE_PLUGINS_ENV)
GREEDY = ["--max-tokens", "8", "--temperature", "0"]


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch):
    for var in VLM_ENV:
        # setenv first so that monkeypatch restores (removes) what add_plugin_file sets later
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    """The engine used directly, for the outputs the CLI must reproduce."""
    from vlm import LLM

    return LLM(tiny_qwen2)


def direct_chat(llm, messages: list[dict[str, str]]) -> str:
    from vlm import SamplingParams

    [output] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))
    return output.outputs[0].text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.startswith("error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# -- vlmrun plugins ------------------------------------------------------------------------


def test_plugins_lists_llama(capsys):
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    at = lines.index("llama  [entry point: vlm-plugin-llama 0.1.0]")
    assert lines[at + 1] == "  architectures: " + ", ".join(LLAMA_ARCHS)
    assert lines[at + 2] == "  hooks: " + ", ".join(LLAMA_HOOKS)
    assert lines[at + 3] == "  plugin API: >=1.0,<2"
    assert captured.err == ""


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    llama = listed["llama"]
    assert llama["version"] == "0.1.0" and llama["distribution"] == "vlm-plugin-llama"
    assert llama["source"] == "entry point" and llama["location"] == "vlm_plugin_llama"
    assert llama["architectures"] == LLAMA_ARCHS
    assert llama["hooks"] == LLAMA_HOOKS
    assert llama["error"] is None


# -- vlmrun which ---------------------------------------------------------------------------


def test_which_names_plugin_and_reason(tiny_qwen2, capsys):
    assert main(["which", "--model", tiny_qwen2]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"model: {tiny_qwen2}"
    assert "architectures: Qwen2ForCausalLM; model_type: qwen2" in out[1]
    assert "plugin: llama (highest-priority claim)" in out
    assert " * llama (priority 0): architecture Qwen2ForCausalLM" in out


def test_which_with_two_equal_claims_lists_both_and_errors(tiny_qwen2, capsys):
    assert main(["which", "--model", tiny_qwen2, "--plugin-file", str(RIVAL)]) == 1
    captured = capsys.readouterr()
    assert "claims:" in captured.out
    assert "   llama (priority 0): architecture Qwen2ForCausalLM" in captured.out
    assert "   vlmtest_rival_qwen2 (priority 0): rival model_type qwen2" in captured.out
    assert_one_line_error(
        captured.err, "'llama'", "'vlmtest_rival_qwen2'", "--plugin llama", "--plugin vlmtest_rival_qwen2"
    )


def test_which_with_forced_plugin(tiny_qwen2, capsys):
    argv = ["which", "--model", tiny_qwen2, "--plugin-file", str(RIVAL), "--plugin", "vlmtest_rival_qwen2"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "plugin: vlmtest_rival_qwen2 (forced with --plugin)" in out
    assert " * vlmtest_rival_qwen2 (priority 0): rival model_type qwen2" in out
    assert "   llama (priority 0): architecture Qwen2ForCausalLM" in out


# -- vlmrun check ---------------------------------------------------------------------------


def test_check_good_checkpoint(tiny_qwen2, capsys):
    assert main(["check", "--model", tiny_qwen2]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "plugin: llama" in out
    config = out[out.index("config:") + 1 :]
    assert "  model_type: qwen2" in config
    assert "  architectures: ['Qwen2ForCausalLM']" in config
    assert any(line.startswith("  text: {") and "'hidden_size': 64" in line for line in config)
    assert any(line.startswith("tokenizer: ") and "FAILED" not in line for line in out)
    assert any(line.startswith("checkpoint: model.safetensors (") for line in out)
    assert out[-1] == "OK"


@pytest.fixture(scope="module")
def damaged_checkpoint(tiny_qwen2, tmp_path_factory) -> str:
    """A copy of the tiny model with one tensor removed, one added and one mis-shaped."""
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(tiny_qwen2, path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def test_check_damaged_checkpoint_lists_each_problem(damaged_checkpoint, capsys):
    assert main(["check", "--model", damaged_checkpoint]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[out.index("missing (1):") + 1] == "  model.layers.1.self_attn.k_proj.weight"
    assert out[out.index("unexpected (1):") + 1] == "  model.layers.0.mlp.extra_proj.weight"
    assert out[out.index("mis-shaped (1):") + 1] == "  model.norm.weight (expected [64], got [32])"
    assert out[-1] == "PROBLEMS FOUND"

    assert main(["check", "--model", damaged_checkpoint, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["missing"] == ["model.layers.1.self_attn.k_proj.weight"]
    assert report["unexpected"] == ["model.layers.0.mlp.extra_proj.weight"]
    assert report["mis_shaped"] == ["model.norm.weight (expected [64], got [32])"]


def test_run_refuses_damaged_checkpoint(damaged_checkpoint, capsys):
    assert main(["--model", damaged_checkpoint, "--prompt", "Hello", *GREEDY]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "model.norm.weight", "vlmrun check")


# -- one-shot generation ------------------------------------------------------------------


def test_one_shot_prints_only_the_generated_text(tiny_qwen2, llm, capsys):
    expected = direct_chat(llm, [user("Hello")])
    assert expected  # an empty reply would prove nothing
    assert main(["--model", tiny_qwen2, "--prompt", "Hello", *GREEDY]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_one_shot_prompt_from_stdin(tiny_qwen2, llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert main(["run", "--model", tiny_qwen2, "--prompt", "-", *GREEDY]) == 0
    assert capsys.readouterr().out == direct_chat(llm, [user("Hello")]) + "\n"


def test_one_shot_logs_go_to_stderr(tiny_qwen2, llm):
    """In a fresh process, so the CLI's own logging setup is in force (pytest owns it here)."""
    env = {k: v for k, v in os.environ.items() if k not in VLM_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", "-v", "--model", tiny_qwen2, "--prompt", "Hello", *GREEDY],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == (direct_chat(llm, [user("Hello")]) + "\n").encode()
    assert b"INFO vlm: loaded" in proc.stderr


# -- interactive chat -------------------------------------------------------------------------


@pytest.fixture
def recorded_streams(monkeypatch):
    """Every message list the chat sends to ``LLM.stream``, with the text it streamed back."""
    from vlm.llm import LLM

    calls: list[tuple[list[dict[str, str]], str]] = []
    original = LLM.stream

    def stream(self, prompt, sampling_params=None):
        pieces = []
        for piece in original(self, prompt, sampling_params):
            pieces.append(piece)
            yield piece
        calls.append(([dict(m) for m in prompt], "".join(pieces)))

    monkeypatch.setattr(LLM, "stream", stream)
    return calls


def chat(monkeypatch, model: str, stdin: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["--model", model, *GREEDY])


def test_chat_keeps_history_and_clear_starts_over(tiny_qwen2, llm, monkeypatch, capsys, recorded_streams):
    stdin = "Hello\nHow are you?\n/clear\nHello\n/exit\nnever sent\n"
    assert chat(monkeypatch, tiny_qwen2, stdin) == 0
    captured = capsys.readouterr()

    assert len(recorded_streams) == 3  # /exit stopped before "never sent"
    (first, reply1), (second, reply2), (third, reply3) = recorded_streams
    assert first == [user("Hello")]
    assert second == [user("Hello"), {"role": "assistant", "content": reply1}, user("How are you?")]
    assert third == [user("Hello")]  # /clear dropped the history

    assert reply1 == direct_chat(llm, first)
    assert reply2 == direct_chat(llm, second)
    assert reply3 == reply1  # the turn after /clear equals a fresh first turn
    assert captured.out == f"{reply1}\n{reply2}\n{reply3}\n"  # replies only, nothing else
    assert "(history cleared)" in captured.err


def test_chat_eof_quits_cleanly(tiny_qwen2, monkeypatch, capsys, recorded_streams):
    assert chat(monkeypatch, tiny_qwen2, "Hello\n") == 0
    assert [messages for messages, _ in recorded_streams] == [[user("Hello")]]
    assert capsys.readouterr().out == recorded_streams[0][1] + "\n"


def test_chat_unknown_command_prints_hint(tiny_qwen2, monkeypatch, capsys, recorded_streams):
    assert chat(monkeypatch, tiny_qwen2, "/bogus\n\n/quit\n") == 0
    captured = capsys.readouterr()
    assert recorded_streams == []  # neither the command nor the blank line reached the model
    assert captured.out == ""
    assert "unknown command /bogus" in captured.err
    assert "/clear" in captured.err and "/exit" in captured.err


class Terminal(io.StringIO):
    """Typed lines: the chat reads them as from a person at a terminal (``isatty``)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    qwen2vl = pytest.importorskip("vlm_plugin_qwen2vl.testing")
    return str(qwen2vl.write_tiny_qwen2_vl(tmp_path_factory.mktemp("chat-vlm") / "qwen2-vl", "qwen2_vl", seed=1))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("chat-picture") / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


def picture_turn(text: str, sent: dict) -> dict:
    """``user_message(text, [the picture sent])``, after checking ``sent`` is that turn with one picture."""
    from vlm.cli.run import user_message

    assert [part["type"] for part in sent["content"]] == ["image", "text"], sent
    return user_message(text, [sent["content"][0]["image"]])


def test_a_vlm_chat_in_a_terminal_asks_for_the_picture_first(tiny_vlm, picture, monkeypatch, capsys, recorded_streams):
    """CogVLM's chat flow, for every VLM: each conversation starts with "image path" (a bad one
    is reported and asked again, Enter means text only), then turns with history; /clear asks again."""
    import numpy as np
    from PIL import Image

    from vlm import LLM, SamplingParams
    from vlm.cli.run import PICTURE_PROMPT

    typed = ["/no/such/picture.png", f"'{picture}'", "What is it?", "And the colours?", "/clear", "", "Hello", "/exit"]
    monkeypatch.setattr(sys, "stdin", Terminal("\n".join(typed) + "\n"))
    assert main(["--model", tiny_vlm, *GREEDY]) == 0
    captured = capsys.readouterr()

    (first, reply1), (second, reply2), (third, reply3) = recorded_streams
    sent = first[0]["content"][0]["image"]
    assert np.array_equal(np.asarray(sent), np.asarray(Image.open(picture)))  # the quoted path, loaded
    assert first == [picture_turn("What is it?", first[0])]
    assert second == [*first, {"role": "assistant", "content": reply1}, user("And the colours?")]
    assert third == [user("Hello")]  # after /clear, Enter: a text-only conversation
    with LLM(tiny_vlm) as llm:
        direct = llm.chat([first, second, third], SamplingParams(temperature=0, max_tokens=8))
    assert [reply1, reply2, reply3] == [output.outputs[0].text for output in direct]
    assert captured.out == f"{reply1}\n{reply2}\n{reply3}\n"  # replies only, nothing else

    err = captured.err
    assert err.count(PICTURE_PROMPT) == 3  # the bad path, the picture, and after /clear
    assert "error: image '/no/such/picture.png': no such file; check the path\n" in err
    assert f"(attached {picture}; it goes with your first message)" in err
    assert "(no picture: a text-only conversation; /image PATH attaches one later)" in err


def test_the_picture_question_is_skipped_when_given_or_piped_or_text_only(
    tiny_vlm, tiny_qwen2, picture, monkeypatch, capsys, recorded_streams
):
    from vlm.cli.run import PICTURE_PROMPT

    # --image answers it for the first conversation; /clear starts one that asks
    monkeypatch.setattr(sys, "stdin", Terminal("Hi\n/clear\n\nHello\n"))
    assert main(["--model", tiny_vlm, "--image", picture, *GREEDY]) == 0
    assert capsys.readouterr().err.count(PICTURE_PROMPT) == 1
    (first, _), (second, _) = recorded_streams
    assert first == [picture_turn("Hi", first[0])] and second == [user("Hello")]

    # piped lines are turns, never a picture's path (scripts keep working)
    recorded_streams.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["--model", tiny_vlm, *GREEDY]) == 0
    assert PICTURE_PROMPT not in capsys.readouterr().err
    assert [messages for messages, _ in recorded_streams] == [[user("Hello")]]

    # a text model in a terminal is not asked
    recorded_streams.clear()
    monkeypatch.setattr(sys, "stdin", Terminal("Hello\n"))
    assert main(["--model", tiny_qwen2, *GREEDY]) == 0
    assert PICTURE_PROMPT not in capsys.readouterr().err
    assert [messages for messages, _ in recorded_streams] == [[user("Hello")]]


def test_run_help_tells_how_a_chat_starts(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "asks for a picture's path at the start of each conversation" in help_text
    assert "/image PATH" in help_text and "/clear" in help_text and "'image path (Enter for text only):'" in help_text


# -- errors -------------------------------------------------------------------------------------


def test_missing_model_is_one_line_error(capsys):
    assert main(["--model", "/nonexistent/model", "--prompt", "Hello"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "/nonexistent/model", "not found")


def test_bad_temperature_is_refused_before_loading(tiny_qwen2, monkeypatch, capsys):
    from vlm.llm import LLM

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the sampling flags were validated")

    monkeypatch.setattr(LLM, "__init__", must_not_load)
    assert main(["--model", tiny_qwen2, "--prompt", "Hello", "--temperature", "-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "temperature", "-1")


@pytest.mark.parametrize("command", [["run", "--prompt", "Hello"], ["check"], ["which"]])
def test_broken_config_json_is_one_line_error(tmp_path, capsys, command):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64,')
    assert main([command[0], "--model", str(tmp_path), *command[1:]]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert_one_line_error(captured.err, "config.json", "not valid JSON")
