"""pytest fixtures for vlm and its plugins (registered through the ``pytest11`` entry point).

- ``tiny_models(model_type, **overrides)``: path of a tiny random transformers checkpoint with a
  locally built tokenizer, written once per test session.
- ``tiny_qwen2``: the default one.
"""

from __future__ import annotations

import os

# Triton reads this when its kernels are first defined; vlm.kernels defines them lazily, but set
# it before anything can import them so interpreter tests work in any order.
os.environ.setdefault("TRITON_INTERPRET", "1")
# nothing in a test session may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from vlm.testing.checkpoints import write_tiny_text_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple, str] = {}

    def get(model_type: str = "qwen2", **overrides) -> str:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            name = model_type + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
            cache[key] = str(write_tiny_text_model(root / name, model_type, **overrides))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models) -> str:
    return tiny_models("qwen2")
