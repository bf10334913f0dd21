"""Config builders (plugin contract 1.1): a plugin reads a config.json in its own naming.

The checkpoint is a tiny Llama whose config.json is rewritten the way some repositories name
things (``num_layers``, ``inner_hidden_size``, ``model_class``); the weights are untouched. A plugin
file ships a :class:`vlm.plugin.ConfigBuilder` that translates it back into transformers'
``LlamaConfig``, so vlm-plugin-llama serves it. Run through the CLI in fresh processes: the
builder's registry scope then lives only as long as the process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BUILDER_FILE = textwrap.dedent(
    """
    from vlm.plugin import CONFIG_BUILDERS, ConfigBuilder, Registry, build_model_config

    vlm_api_version = ">=1.1,<2"

    BUILDERS = Registry("config_builder", parent=CONFIG_BUILDERS, scope="myglm")


    @BUILDERS.register_module()
    class MyGLMConfigBuilder(ConfigBuilder):
        @classmethod
        def condition(cls, hf_config):
            return getattr(hf_config, "model_class", None) == "MyGLMForCausalLM"

        @classmethod
        def build(cls, hf_config, model_path):
            from transformers import LlamaConfig

            config = LlamaConfig(
                architectures=["LlamaForCausalLM"],
                vocab_size=hf_config.padded_vocab_size,
                hidden_size=hf_config.hidden_size,
                intermediate_size=hf_config.inner_hidden_size,
                num_hidden_layers=hf_config.num_layers,
                num_attention_heads=hf_config.num_heads,
                num_key_value_heads=hf_config.multi_query_group_num,
                max_position_embeddings=hf_config.seq_length,
                rms_norm_eps=hf_config.layernorm_epsilon,
                rope_theta=hf_config.rope_base,
                tie_word_embeddings=hf_config.tie_word_embeddings,
                bos_token_id=hf_config.bos_token_id,
                eos_token_id=hf_config.eos_token_id,
                pad_token_id=hf_config.pad_token_id,
            )
            return build_model_config(model_path, config, torch_dtype="float32")
    """
)

GREEDY = ["--max-tokens", "12", "--temperature", "0"]


@pytest.fixture(scope="module")
def renamed_checkpoint(tiny_models, tmp_path_factory):
    """The tiny Llama with its config.json in another family's naming (weights unchanged)."""
    original = tiny_models("llama")
    renamed = tmp_path_factory.mktemp("myglm") / "myglm"
    shutil.copytree(original, renamed)
    config = json.loads((renamed / "config.json").read_text())
    rope_base = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0
    mine = {
        "model_type": "myglm",
        "model_class": "MyGLMForCausalLM",
        "padded_vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "inner_hidden_size": config["intermediate_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "multi_query_group_num": config["num_key_value_heads"],
        "seq_length": config["max_position_embeddings"],
        "layernorm_epsilon": config["rms_norm_eps"],
        "rope_base": rope_base,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "torch_dtype": "float32",
    }
    (renamed / "config.json").write_text(json.dumps(mine, indent=2))
    builder = renamed.parent / "myglm_builder.py"
    builder.write_text(BUILDER_FILE)
    return original, str(renamed), str(builder)


def vlmrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("VLM_PLUGIN_FILES", None)
    return subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_builder_config_runs_like_the_original(renamed_checkpoint):
    original, renamed, builder = renamed_checkpoint
    expected = vlmrun("--model", original, "--prompt", "Hello there", *GREEDY)
    assert expected.returncode == 0, expected.stderr
    got = vlmrun("--model", renamed, "--plugin-file", builder, "--prompt", "Hello there", *GREEDY)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout and got.stdout.strip()


def test_check_shows_the_model_config_the_builder_made(renamed_checkpoint):
    original, renamed, builder = renamed_checkpoint
    result = vlmrun("check", "--model", renamed, "--plugin-file", builder, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["plugin"] == "llama"
    config = report["config"]
    assert config["config_builder"].endswith("MyGLMConfigBuilder")
    original_config = json.loads((Path(original) / "config.json").read_text())
    assert config["text"]["num_hidden_layers"] == original_config["num_hidden_layers"]
    assert config["text"]["num_key_value_heads"] == original_config["num_key_value_heads"]
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_without_a_builder_the_error_is_one_line_and_says_what_to_do(renamed_checkpoint):
    _, renamed, _ = renamed_checkpoint
    result = vlmrun("--model", renamed, "--prompt", "Hello", *GREEDY)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "num_hidden_layers" in lines[0] and "config builder" in lines[0] and "'myglm'" in lines[0]
