"""config.json validation (ModelConfig) and engine settings (EngineConfig).

Every error the user can hit is a :class:`vlm.errors.ConfigError` whose message is one line that
names the file or field at fault and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.config import EngineConfig, RawConfig, load_model_config
from vlm.errors import ConfigError


def _write_config(directory: Path, content) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    (directory / "config.json").write_text(text)
    return directory


def _config_error(directory: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_model_config(directory)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def qwen2_config(tiny_qwen2) -> dict:
    return json.loads((Path(tiny_qwen2) / "config.json").read_text())


# -- the tiny checkpoints of every text family --------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_text_models(tiny_models, model_type):
    path = tiny_models(model_type)
    config = load_model_config(path)
    assert config.path == str(path)
    assert config.model_type == model_type
    assert len(config.architectures) == 1 and config.architectures[0].lower().startswith(model_type)
    assert config.torch_dtype == "float32"
    assert config.is_multimodal is False
    text = config.text
    assert text.vocab_size == 320
    assert text.hidden_size == 64
    assert text.num_hidden_layers == 2
    assert text.num_attention_heads == 4
    assert text.num_key_value_heads == 2
    assert text.head_dim == 16  # hidden_size / heads (qwen3 states it explicitly)
    assert text.max_position_embeddings == 512
    # transformers' own config object is kept for the plugins
    assert config.hf_config.model_type == model_type
    assert "hf_config" not in config.summary()


def test_qwen3_explicit_head_dim_wins(tmp_path, tiny_models):
    """Qwen3 declares head_dim; it need not be hidden_size / num_attention_heads."""
    raw = json.loads((Path(tiny_models("qwen3")) / "config.json").read_text())
    raw["head_dim"] = 32  # 4 heads x 32 = 128 != hidden_size 64
    config = load_model_config(_write_config(tmp_path / "qwen3-hd32", raw))
    assert config.text.head_dim == 32
    assert config.text.hidden_size == 64


def test_head_dim_derived_when_absent(tmp_path, qwen2_config):
    raw = dict(qwen2_config, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    raw.pop("head_dim", None)
    config = load_model_config(_write_config(tmp_path / "m", raw))
    assert config.text.head_dim == 16
    assert config.text.num_key_value_heads == 3


@pytest.mark.parametrize("model_type", ["llama", "my_custom_lm"])
def test_kv_heads_default_to_attention_heads(tmp_path, qwen2_config, model_type):
    # llama: transformers fills the default; my_custom_lm (a RawConfig): the core does
    raw = dict(qwen2_config, model_type=model_type, architectures=["LlamaForCausalLM"])
    raw.pop("num_key_value_heads")
    config = load_model_config(_write_config(tmp_path / "m", raw))
    assert config.text.num_key_value_heads == config.text.num_attention_heads == 4


def test_bf16_checkpoint_declares_its_dtype(tiny_models):
    config = load_model_config(tiny_models("llama", dtype="bfloat16"))
    assert config.torch_dtype == "bfloat16"


# -- errors --------------------------------------------------------------------------------------


def test_no_config_json(tmp_path):
    message = _config_error(tmp_path)
    assert "no config.json" in message
    assert str(tmp_path) in message
    assert "Hugging Face layout" in message


def test_broken_json_names_line_and_column(tmp_path):
    directory = _write_config(tmp_path / "m", '{\n  "model_type": "qwen2",\n  "vocab_size": ,\n}')
    message = _config_error(directory)
    assert str(directory / "config.json") in message
    assert "not valid JSON" in message
    assert "line 3 column 17" in message
    assert "re-download" in message


def test_not_utf8(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    assert "not valid JSON" in _config_error(directory)


def test_json_list_instead_of_object(tmp_path):
    message = _config_error(_write_config(tmp_path / "m", [{"model_type": "qwen2"}]))
    assert "must hold a JSON object" in message
    assert "list" in message


def test_neither_model_type_nor_architectures(tmp_path):
    message = _config_error(_write_config(tmp_path / "m", {"vocab_size": 10, "hidden_size": 8}))
    assert "'model_type'" in message and "'architectures'" in message
    assert "add the one" in message


def test_zero_attention_heads_names_the_field(tmp_path, qwen2_config):
    message = _config_error(_write_config(tmp_path / "m", dict(qwen2_config, num_attention_heads=0)))
    assert "'num_attention_heads'" in message
    assert "(got 0)" in message
    assert "fix config.json" in message
    # only the real cause: no follow-on complaint about the head_dim it would have given
    assert "head_dim" not in message


def test_heads_not_divisible_by_kv_heads(tmp_path, qwen2_config):
    raw = dict(qwen2_config, num_attention_heads=4, num_key_value_heads=3)
    message = _config_error(_write_config(tmp_path / "m", raw))
    assert "num_attention_heads (4) must be a multiple of num_key_value_heads (3)" in message
    assert "fix config.json" in message


def test_missing_required_field_named(tmp_path, qwen2_config):
    raw = {k: v for k, v in qwen2_config.items() if k != "vocab_size"}
    raw["model_type"] = "my_custom_lm"  # unknown to transformers, so nothing fills the default
    message = _config_error(_write_config(tmp_path / "m", raw))
    assert "'vocab_size'" in message and "Field required" in message


def test_underivable_head_dim_says_to_set_it(tmp_path, qwen2_config):
    raw = dict(qwen2_config, model_type="my_custom_lm", hidden_size=66, num_attention_heads=4)
    raw.pop("head_dim", None)
    message = _config_error(_write_config(tmp_path / "m", raw))
    assert "hidden_size (66)" in message and "num_attention_heads (4)" in message
    assert "set head_dim" in message


# -- configs transformers does not know ---------------------------------------------------------


def test_unknown_model_type_loads_as_raw_config(tmp_path, qwen2_config):
    llm_config = dict(qwen2_config, torch_dtype="bfloat16")
    llm_config.pop("dtype", None)
    raw = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "template": "internvl2_5",
        "downsample_ratio": 0.5,
        "llm_config": llm_config,
        "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 32, "image_size": 448},
    }
    config = load_model_config(_write_config(tmp_path / "internvl", raw))
    hf = config.hf_config
    assert isinstance(hf, RawConfig)
    # attribute access, nested dicts included
    assert hf.model_type == "internvl_chat"
    assert hf.architectures == ["InternVLChatModel"]
    assert hf.template == "internvl2_5"
    assert hf.downsample_ratio == 0.5
    assert hf.vision_config.hidden_size == 32
    assert hf.llm_config.architectures == ["Qwen2ForCausalLM"]
    # the nested language model config is the text config
    assert hf.get_text_config() is hf.llm_config
    assert hf.get_text_config().hidden_size == 64
    assert config.is_multimodal is True
    assert config.model_type == "internvl_chat"
    assert config.architectures == ["InternVLChatModel"]
    assert config.text.vocab_size == 320
    assert config.text.num_attention_heads == 4
    assert config.text.num_key_value_heads == 2
    assert config.text.head_dim == 16
    assert config.torch_dtype == "bfloat16"  # from the nested config: the top level declares none
    as_dict = hf.to_dict()
    assert as_dict["template"] == "internvl2_5"
    assert as_dict["llm_config"]["hidden_size"] == 64
    assert as_dict["vision_config"]["image_size"] == 448


def test_raw_config_without_nested_text_config_is_its_own_text_config(tmp_path, qwen2_config):
    raw = dict(qwen2_config, model_type="my_custom_lm", architectures=["MyCustomLM"])
    config = load_model_config(_write_config(tmp_path / "m", raw))
    assert isinstance(config.hf_config, RawConfig)
    assert config.hf_config.get_text_config() is config.hf_config
    assert config.is_multimodal is False
    assert config.text.hidden_size == 64


def test_raw_config_nested_error_says_text_config(tmp_path, qwen2_config):
    raw = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "llm_config": dict(qwen2_config, num_attention_heads=0),
    }
    message = _config_error(_write_config(tmp_path / "m", raw))
    assert "text config" in message and "'num_attention_heads'" in message


def test_raw_config_architectures_only(tmp_path, qwen2_config):
    raw = {k: v for k, v in qwen2_config.items() if k != "model_type"}
    config = load_model_config(_write_config(tmp_path / "m", raw))
    assert config.model_type is None
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert config.hf_config.model_type is None


# -- engine settings -----------------------------------------------------------------------------


def test_engine_config_defaults():
    config = EngineConfig(model="some/dir")
    assert config.dtype == "auto"
    assert config.device == "auto"
    assert config.max_model_len is None
    assert config.max_num_seqs == 64
    assert config.block_size == 16
    assert config.allow_download is False


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": -5}, "max_model_len"),
        ({"kv_cache_gib": 0}, "kv_cache_gib"),
        ({"block_size": "sixteen"}, "block_size"),
        ({"max_num_seq": 4}, "max_num_seq"),
        ({"unknown_option": True}, "unknown_option"),
    ],
)
def test_engine_config_bad_value_names_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        EngineConfig(model="some/dir", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"engine setting '{field}'")
    flag = EngineConfig._flags.get(field)
    assert f"engine setting '{field}'{f' ({flag})' if flag else ''}:" in message
    assert repr(next(iter(kwargs.values()))) in message


def test_engine_config_dtype_error_lists_choices():
    with pytest.raises(ConfigError) as info:
        EngineConfig(model="m", dtype="int8")
    for choice in ("auto", "float32", "bfloat16", "float16"):
        assert choice in str(info.value)


def test_engine_config_misspelling_suggests_field():
    with pytest.raises(ConfigError) as info:
        EngineConfig(model="m", max_num_seq=4)
    assert "did you mean 'max_num_seqs'" in str(info.value)


def test_engine_config_model_required():
    with pytest.raises(ConfigError) as info:
        EngineConfig()
    assert "'model'" in str(info.value) and "\n" not in str(info.value)


def test_engine_config_assignment_validated():
    config = EngineConfig(model="m")
    with pytest.raises(ConfigError) as info:
        config.max_num_seqs = 0
    assert "'max_num_seqs'" in str(info.value)
    assert config.max_num_seqs == 64
