"""Checkpoint layouts found in the wild: the flat config.json Qwen's own repositories ship (text
fields at the top level, ``rope_scaling: {type: mrope}``, tied embeddings for the 2B model), and
tensors under transformers' in-memory names (``model.visual.*``, ``model.language_model.*``).
Also the text config as the Qwen2 config vlm-plugin-llama serves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.config import load_model_config, text_config_of
from vlm.testing.logits import generate_with_logits
from vlm_plugin_qwen2vl.testing import ReferenceModel, reference_inputs, write_tiny_qwen2_vl
from vlm_plugin_qwen2vl.text import as_qwen2_config

NEW_TOKENS = 16


def messages():
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What is it?"}]}]


def flatten_config(path) -> None:
    """Rewrite config.json as Qwen2-VL-2B-Instruct's: no text_config, mrope in rope_scaling."""
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config.update(text)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def tied_flat(tmp_path_factory):
    path = write_tiny_qwen2_vl(tmp_path_factory.mktemp("flat") / "model", "qwen2_vl", seed=2, tie_word_embeddings=True)
    flatten_config(path)
    return str(path)


def test_flat_config_with_tied_embeddings_equals_transformers(tied_flat):
    assert "text_config" not in json.loads(open(f"{tied_flat}/config.json").read())
    llm = LLM(tied_flat)
    inputs = llm.engine.preprocess(messages())
    reference = ReferenceModel.from_pretrained(tied_flat)
    assert reference.model.config.tie_word_embeddings
    ids = torch.tensor([inputs.token_ids])
    with torch.inference_mode():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **reference_inputs(inputs),
        )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    [(tokens, logits)] = generate_with_logits(llm, [messages()], params)
    assert tokens == out.sequences[0, ids.shape[1] :].tolist()
    torch.testing.assert_close(logits, torch.stack([step[0] for step in out.logits]), atol=1e-4, rtol=0)


def test_text_config_becomes_qwen2_with_mrope(tied_flat):
    hf_config = load_model_config(tied_flat).hf_config
    text = text_config_of(hf_config)
    text.tie_word_embeddings = hf_config.tie_word_embeddings
    qwen2 = as_qwen2_config(text)
    assert (qwen2.model_type, qwen2.architectures) == ("qwen2", ["Qwen2ForCausalLM"])
    assert qwen2.rope_parameters["mrope_section"] == [2, 3, 3] and qwen2.rope_parameters["rope_theta"] == 10000.0
    assert qwen2.tie_word_embeddings is True
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
    ):
        assert getattr(qwen2, field) == getattr(text, field)


def test_in_memory_tensor_names_load_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    saved = write_tiny_qwen2_vl(tmp_path / "saved", "qwen2_5_vl", seed=3)
    renamed = tmp_path / "renamed"
    shutil.copytree(saved, renamed)
    tensors = load_file(str(saved / "model.safetensors"))
    assert any(name.startswith("visual.") for name in tensors) and any(
        name.startswith("model.layers.") for name in tensors
    )

    def in_memory(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name

    save_file(
        {in_memory(n): t for n, t in tensors.items()}, str(renamed / "model.safetensors"), metadata={"format": "pt"}
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [(want, want_logits)] = generate_with_logits(LLM(str(saved)), [messages()], params)
    [(got, got_logits)] = generate_with_logits(LLM(str(renamed)), [messages()], params)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "vision, needle",
    [
        ({"window_size": 14}, "window_size 14 is smaller than one merged token"),
        ({"patch_size": None}, "vision_config is incomplete"),
    ],
)
def test_broken_vision_configs_are_one_line_errors(vision, needle):
    from types import SimpleNamespace

    from transformers import Qwen2_5_VLConfig

    from vlm.errors import ConfigError
    from vlm_plugin_qwen2vl.model import VisionSettings

    base = Qwen2_5_VLConfig(vision_config={"depth": 2, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 64})
    fields = {**base.vision_config.to_dict(), **vision}
    config = SimpleNamespace(
        model_type="qwen2_5_vl", vision_config=SimpleNamespace(**{k: v for k, v in fields.items() if v is not None})
    )
    with pytest.raises(ConfigError, match=needle) as exc:
        VisionSettings(config)
    assert "\n" not in str(exc.value)
