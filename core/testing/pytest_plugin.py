"""pytest fixtures for vlm and its plugins (registered through the ``pytest11`` entry point).

- ``tiny_models(model_type, **overrides)``: path of a tiny random transformers checkpoint with a
  locally built tokenizer, written once per test session.
- ``tiny_qwen2``: the default one.

Installing vlm-core adds this plugin to every pytest run in the environment, so it sets nothing
globally: no environment variable is touched (``tests/test_pytest_plugin.py`` checks it). vlm's
own suite sets ``TRITON_INTERPRET`` and ``HF_HUB_OFFLINE`` in the repository's ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    from vlm.testing.checkpoints import write_tiny_text_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple, str] = {}

    def get(model_type: str = "qwen2", **overrides: Any) -> str:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            name = model_type + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
            cache[key] = str(write_tiny_text_model(root / name, model_type, **overrides))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models) -> str:
    return tiny_models("qwen2")
