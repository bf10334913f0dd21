"""LLaVA checkpoints in every tensor layout load into the same model; what LLaVA never reads is
skipped on purpose (layers after the deepest feature layer, post_layernorm, SigLIP's head);
configs the model cannot run are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlm import LLM
from vlm.config import load_model_config
from vlm.errors import ConfigError
from vlm_plugin_llava.model import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from vlm_plugin_llava.testing import LAYOUTS, write_tiny_llava


@pytest.mark.parametrize("variant", ["llava-clip-llama", "llava-next-clip-mistral"])
def test_every_layout_loads_the_same_weights(tmp_path, llava_checkpoints, variant):
    from transformers import AutoModelForImageTextToText

    hub = LLM(llava_checkpoints[variant]).engine.model.state_dict()
    reference = AutoModelForImageTextToText.from_pretrained(llava_checkpoints[variant]).state_dict()
    for layout in LAYOUTS:
        path = write_tiny_llava(tmp_path / layout, variant, layout=layout)
        loaded = LLM(str(path)).engine.model.state_dict()
        assert loaded.keys() == hub.keys()
        for name, tensor in hub.items():
            assert torch.equal(loaded[name], tensor), (layout, name)
        # transformers reads the same layout into the same weights
        theirs = AutoModelForImageTextToText.from_pretrained(path).state_dict()
        assert all(torch.equal(theirs[name], reference[name]) for name in reference), layout


def test_what_llava_never_reads_is_not_built(llava_checkpoints):
    clip = LLM(llava_checkpoints["llava-clip-llama"]).engine.model
    assert len(clip.vision_tower.encoder.layers) == 2  # vision_feature_layer -2 of 3 layers
    assert clip.vision_tower.pre_layrnorm is not None
    siglip = LLM(llava_checkpoints["llava-siglip-qwen2"]).engine.model
    assert len(siglip.vision_tower.encoder.layers) == 3  # [-1, 0]: the last layer and the embeddings are read
    assert siglip.vision_tower.pre_layrnorm is None
    names = [n for model in (clip, siglip) for n, _ in model.named_parameters()]
    assert not any("post_layernorm" in n or ".head." in n for n in names)
    assert siglip.multi_modal_projector.linear_1.bias is None  # multimodal_projector_bias: false
    assert siglip.multi_modal_projector.linear_1.in_features == 2 * 32  # two feature layers side by side


def build_with(source: str, path, model_class, **changes):
    """Build (on the meta device) a model of ``source``'s config.json with ``changes``."""
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    model_config = load_model_config(path)
    return model_class(model_config.hf_config, model_config, device="meta")


@pytest.mark.parametrize(
    "variant, model_class, changes, needle",
    [
        (
            "llava-next-clip-mistral",
            LlavaNextForConditionalGeneration,
            {"vision_feature_select_strategy": "full"},
            "leaves 5 of 4",
        ),
        ("llava-clip-llama", LlavaForConditionalGeneration, {"vision_feature_layer": -5}, "outside the 3-layer"),
    ],
)
def test_configs_the_model_cannot_run_are_refused(llava_checkpoints, tmp_path, variant, model_class, changes, needle):
    with pytest.raises(ConfigError, match=needle):
        build_with(llava_checkpoints[variant], tmp_path / "edited", model_class, **changes)


def test_an_unknown_vision_tower_is_refused(llava_checkpoints, tmp_path):
    from transformers import AutoConfig

    model_config = load_model_config(llava_checkpoints["llava-clip-llama"])
    hf_config = model_config.hf_config
    hf_config.vision_config = AutoConfig.for_model("dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ConfigError, match="'dinov2'"):
        LlavaForConditionalGeneration(hf_config, model_config, device="meta")


def test_tied_word_embeddings_from_the_text_config(tmp_path):
    """A text config with tied embeddings (small Qwen2s): no lm_head is stored; logits still equal
    transformers'."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from vlm import SamplingParams
    from vlm.testing.logits import generate_with_logits

    path = write_tiny_llava(tmp_path / "tied", "llava-siglip-qwen2", tie_word_embeddings=True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not any("lm_head" in name for name in f.keys())
    llm = LLM(str(path))
    model = llm.engine.model
    assert model.language_model.lm_head.weight.data_ptr() == model.language_model.model.embed_tokens.weight.data_ptr()
    inputs = llm.engine.preprocess([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    reference = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([inputs.token_ids])).logits[0, -1]
    [(tokens, logits)] = generate_with_logits(llm, [inputs.token_ids], SamplingParams(temperature=0, max_tokens=1))
    assert tokens == [int(expected.argmax())]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=0)
