"""vlm_plugin_internvl.testing: both tiny layouts hold the same weights, and the HF one loads in
transformers' processor offline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from vlm_plugin_internvl.testing import load_reference_processor, write_tiny_internvl

# transformers' convert_internvl_weights_to_hf.py (original -> HF), applied to our output
VISION = {
    r"vision_model": r"vision_tower",
    r"layers": r"layer",
    r"class_embedding": r"cls_token",
    r"position_embedding": r"position_embeddings",
    r"patch_embedding": r"patch_embeddings.projection",
    r"ls(\d+)": r"lambda_\1",
    r"attn.proj": r"attention.projection_layer",
    r"attn.dropout": r"attention.projection_dropout",
    r"attn": r"attention",
    r"norm1": r"layernorm_before",
    r"norm2": r"layernorm_after",
}
MULTI = {
    r"mlp1.0": r"multi_modal_projector.layer_norm",
    r"mlp1.1": r"multi_modal_projector.linear_1",
    r"mlp1.3": r"multi_modal_projector.linear_2",
}


def to_hf(name: str) -> str:
    mapping = VISION if name.startswith("vision_model") else MULTI if name.startswith("mlp1") else {}
    for pattern, replacement in mapping.items():
        name = re.sub(pattern, replacement, name)
    return name


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-ckpt")
    return write_tiny_internvl(root / "hf"), write_tiny_internvl(root / "original", layout="original")


def test_original_layout_is_the_same_weights(pair):
    hf_dir, original_dir = pair
    hf, original = load_file(str(hf_dir / "model.safetensors")), load_file(str(original_dir / "model.safetensors"))
    dim = json.loads((original_dir / "config.json").read_text())["vision_config"]["hidden_size"]
    back = {}
    for name, tensor in original.items():
        new = to_hf(name)
        if "attention.qkv" in new:
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                back[new.replace("qkv", part)] = tensor[i * dim : (i + 1) * dim]
        else:
            back[new] = tensor
    assert sorted(back) == sorted(hf)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name
    assert any(name.endswith(".attn.qkv.weight") for name in original)
    assert "language_model.lm_head.weight" in original and "language_model.model.embed_tokens.weight" in original


def test_vision_tensors_are_randomised(pair):
    hf = load_file(str(pair[0] / "model.safetensors"))
    for name, tensor in hf.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert tensor.std() > 0.01, name  # no constant norms / biases / layer scales


def test_original_config(pair):
    config = json.loads((pair[1] / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert config["vision_config"]["model_type"] == "intern_vit_6b"
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["force_image_size"], config["max_dynamic_patch"], config["downsample_ratio"]) == (56, 6, 0.5)
    tokenizer_config = json.loads((pair[1] / "tokenizer_config.json").read_text())
    assert "context_image_token" not in tokenizer_config  # original tokenizers do not name them


def test_reference_processor_loads_offline(pair):
    from transformers import AutoProcessor

    processor = load_reference_processor(pair[0])
    assert processor.image_seq_length == 4 and type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert type(AutoProcessor.from_pretrained(pair[0])) is type(processor)
