"""vlm-plugin-internvl through the conformance kit that every plugin uses (vlm.testing.conformance).

Both checkpoint layouts hold the same tiny random weights, so transformers'
InternVLForConditionalGeneration (loaded from the Hugging Face layout) is the greedy-parity
reference for both: the kit feeds it the token ids and pixels our preprocessor made.

Preprocessing references: transformers' InternVLProcessor for the Hugging Face layout
(vlm_plugin_internvl.testing.load_reference_processor); for the original layout, the prompt
OpenGVLab's ``InternVLChatModel.chat`` builds (written out in :class:`OpenGVLabProcessor`) with
the tiles of transformers' processor for the Hugging Face sibling (OpenGVLab's ``load_image``
makes them bit for bit, see test_preprocess.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.config import RawConfig
from vlm.testing.conformance import PluginConformanceTests
from vlm_plugin_internvl.testing import ORIGINAL_SYSTEM_MESSAGE, load_reference_processor, write_tiny_internvl


@pytest.fixture(scope="module")
def internvl_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-conformance")
    return {layout: str(write_tiny_internvl(root / layout, layout, seed=0)) for layout in ("hf", "original")}


def reference_from_hf_sibling(path: str):
    """The original layout has no transformers class: load the same weights from the HF layout."""
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(Path(path).parent / "hf"))


class OpenGVLabProcessor:
    """The original layout's preprocessing as OpenGVLab's ``InternVLChatModel.chat`` does it (the
    ``internvl2_5`` template): ``<image>\\n`` before the question per image, the system message,
    ChatML; each ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) +
    ``</img>``. The tiles are transformers' processor's for the Hugging Face sibling directory."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tiles = load_reference_processor(Path(path).parent / "hf")
        config = json.loads((Path(path) / "config.json").read_text())
        grid = config["force_image_size"] // config["vision_config"]["patch_size"]
        self.tokens_per_tile = int(grid**2 * config["downsample_ratio"] ** 2)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        query = f"<|im_start|>system\n{ORIGINAL_SYSTEM_MESSAGE}<|im_end|>\n"
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                images = sum(part["type"] == "image" for part in content)
                content = "<image>\n" * images + "".join(p["text"] for p in content if p["type"] == "text")
            query += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
        return query + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, images=None, return_tensors="pt", add_special_tokens=True):
        import torch

        pixel_values = []
        for image in images or []:
            tiles = self.tiles(text="<IMG_CONTEXT>", images=[image], return_tensors="pt")["pixel_values"]
            expansion = "<img>" + "<IMG_CONTEXT>" * self.tokens_per_tile * len(tiles) + "</img>"
            text = text.replace("<image>", expansion, 1)
            pixel_values.append(tiles)
        outputs = self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors)
        if pixel_values:
            outputs["pixel_values"] = torch.cat(pixel_values)
        return outputs


class InternVLConformance(PluginConformanceTests):
    plugin = "internvl"
    foreign_configs = [RawConfig({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})]


class TestHuggingFaceLayout(InternVLConformance):
    reference = "transformers:InternVLForConditionalGeneration"
    reference_processor = staticmethod(load_reference_processor)

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, internvl_checkpoints):
        return internvl_checkpoints["hf"]


class TestOriginalLayout(InternVLConformance):
    reference = reference_from_hf_sibling
    reference_processor = OpenGVLabProcessor

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, internvl_checkpoints):
        return internvl_checkpoints["original"]
