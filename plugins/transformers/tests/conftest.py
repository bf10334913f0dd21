"""Tiny checkpoints of the families the fallback is proven on, pictures, and the transformers reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_plugin_transformers import testing

NEW_TOKENS = 32
WRITERS = {
    "phi3": lambda path: testing.write_tiny_text(path, "phi3"),
    "olmo2": lambda path: testing.write_tiny_text(path, "olmo2"),
    "idefics3": testing.write_tiny_idefics3,
    "gemma3": testing.write_tiny_gemma3,
    "paligemma": testing.write_tiny_paligemma,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for these tiny models: their matrices are too small to split, and on a busy
    machine several threads wait on each other at every op (several times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: the directory of a tiny random checkpoint, written once per session."""
    root = tmp_path_factory.mktemp("fallback-checkpoints")
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = str(WRITERS[family](Path(root) / family))
        return made[family]

    return get


@pytest.fixture(scope="session")
def pictures() -> list[Image.Image]:
    """Random pictures of different sizes and aspect ratios (Idefics3 splits the larger ones into tiles)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 60), (64, 30), (20, 20)]]


def transformers_generate(
    model_dir: str, requests: list[dict], processor: Any = None
) -> list[tuple[list[int], torch.Tensor, list[int]]]:
    """transformers' greedy tokens, per-step logits and prompt ids for each request run alone
    (``{"text": ..., "images": [...]}`` through ``processor``, by default the checkpoint's own, or
    a plain tokenizer for text models); EOS ignored, as vlm's ``ignore_eos``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    vision = processor is not None or (Path(model_dir) / "processor_config.json").exists()
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    if processor is None:
        processor = AutoProcessor.from_pretrained(model_dir) if vision else AutoTokenizer.from_pretrained(model_dir)
    results = []
    for request in requests:
        if vision:
            inputs = processor(text=[request["text"]], images=request["images"] or None, return_tensors="pt")
        else:
            inputs = processor(request["text"], return_tensors="pt")
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
        prompt = inputs["input_ids"][0].tolist()
        results.append((out.sequences[0, len(prompt) :].tolist(), torch.stack([s[0] for s in out.logits]), prompt))
    return results
