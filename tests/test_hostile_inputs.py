"""Hostile inputs that used to end in tracebacks (issue 12): each is one line naming the cause.

- a lone surrogate in a prompt (invalid UTF-16 from JSON, undecodable argv bytes);
- int32 / bool checkpoint tensors for float parameters (were copied in silently);
- a chat template that tries to escape Jinja's sandbox;
- a plugin whose build_model raises;
- ``vlmrun plugins`` says in a summary line that a plugin failed to load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from vlm import LLM
from vlm.errors import InputError, PluginError, WeightsError


def test_a_lone_surrogate_is_an_input_error(tiny_qwen2):
    llm = LLM(tiny_qwen2)
    for prompt in ("bad \ud800 text", [{"role": "user", "content": "bad \udcff text"}]):
        with pytest.raises(InputError, match="not valid Unicode") as err:
            llm.engine.preprocess(prompt)
        assert "\n" not in str(err.value)


def test_a_lone_surrogate_in_a_vlm_prompt_is_an_input_error(tmp_path):
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    llm = LLM(str(write_tiny_qwen2_vl(tmp_path / "q", "qwen2_vl", seed=0)), dtype="float32")
    with pytest.raises(InputError, match="not valid Unicode"):
        llm.engine.preprocess([{"role": "user", "content": "x \ud800"}])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_weights_for_float_parameters_are_refused(tiny_qwen2, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model"
    shutil.copytree(tiny_qwen2, path)
    [weights] = list(path.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(weights))
    with pytest.raises(WeightsError) as err:
        LLM(str(path))
    message = str(err.value)
    assert name in message and str(dtype) in message and "\n" not in message


def test_a_sandbox_escaping_chat_template_is_one_line(tiny_qwen2, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_qwen2, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    # an immutable sandbox refuses to mutate a list: jinja raises SecurityError at render time
    config["chat_template"] = "{% set x = [] %}{% for m in messages %}{{ m['content'] }}{{ x.append(1) }}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(config["chat_template"])  # transformers 5 reads this one first
    llm = LLM(str(path))
    with pytest.raises(InputError) as err:
        llm.engine.preprocess([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value) and "chat template" in str(err.value)


RAISING_PLUGIN = textwrap.dedent(
    """
    from vlm.plugin import Claim, hookimpl

    vlm_api_version = ">=1.0,<2"

    @hookimpl
    def architectures():
        return ["Qwen2ForCausalLM"]

    @hookimpl
    def match(hf_config):
        return Claim(priority=100, reason="always")

    @hookimpl
    def build_model(hf_config, dtype, device):
        raise KeyError("num_experts")

    @hookimpl
    def build_preprocessor(tokenizer):
        from vlm.plugin import TextPreprocessor

        return TextPreprocessor(tokenizer)
    """
)


def test_a_plugin_whose_build_model_raises_is_one_line_naming_it(tiny_qwen2, tmp_path):
    plugin = tmp_path / "raises_in_build.py"
    plugin.write_text(RAISING_PLUGIN)
    env_path = os_pathsep_join(sys.path)
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", "--model", tiny_qwen2, "--plugin-file", str(plugin), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "'raises_in_build'" in lines[0] and "build_model" in lines[0] and "KeyError" in lines[0]


def test_registry_call_wraps_only_foreign_exceptions():
    from vlm.plugin.manager import PluginRegistry

    registry = PluginRegistry()

    class Boom:
        from vlm.hookspecs import hookimpl

        @hookimpl
        def build_preprocessor(self, tokenizer):
            raise ValueError("bad\nsecond line")

    registry.pm.register(Boom(), name="boom")
    with pytest.raises(PluginError, match=r"plugin 'boom' failed in its build_preprocessor hook \(ValueError: bad\)"):
        registry.call("boom", "build_preprocessor", hf_config=None, model_config=None, model_path=None, tokenizer=None)


def test_vlmrun_plugins_says_when_a_plugin_failed_to_load(tmp_path):
    site = tmp_path / "site"
    (site / "vlmtest_broken_summary.py").parent.mkdir(parents=True)
    (site / "vlmtest_broken_summary.py").write_text("raise RuntimeError('boom')\n")
    info = site / "vlmtest_broken_summary-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmtest-broken-summary\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlm.models]\nbroken_summary = vlmtest_broken_summary\n")
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", "plugins"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": os_pathsep_join([str(site), *sys.path])},
    )
    assert result.returncode == 0
    assert "FAILED: import failed: RuntimeError: boom" in result.stdout
    assert "1 plugin(s) failed to load: broken_summary" in result.stderr


def os_pathsep_join(paths) -> str:
    import os

    return os.pathsep.join(str(p) for p in paths if p)
