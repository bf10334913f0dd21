"""LLaVA checkpoints in every tensor layout load into the same model; what LLaVA never reads is
skipped on purpose (layers after the deepest feature layer, post_layernorm, SigLIP's head)."""

from __future__ import annotations

import pytest
import torch

from vlm import LLM
from vlm.testing.llava import LAYOUTS, write_tiny_llava


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
    assert len(siglip.vision_tower.encoder.layers) == 3  # [-3, -1]: the last layer is read
    assert siglip.vision_tower.pre_layrnorm is None
    names = [n for model in (clip, siglip) for n, _ in model.named_parameters()]
    assert not any("post_layernorm" in n or ".head." in n for n in names)
    assert siglip.multi_modal_projector.linear_1.bias is None  # multimodal_projector_bias: false
    assert siglip.multi_modal_projector.linear_1.in_features == 2 * 32  # two feature layers side by side
