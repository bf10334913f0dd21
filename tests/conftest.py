"""Core tests. The shared fixtures (tiny_models, tiny_qwen2) come from vlm.testing.pytest_plugin,
which vlm-core registers as a pytest plugin, so plugin test suites get them too."""

import importlib.util
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The hostile-input corpus's pictures (``tests/corpus/media.py``), written to a fresh directory."""
    spec = importlib.util.spec_from_file_location("corpus_media", CORPUS / "media.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_media(tmp_path_factory.mktemp("corpus") / "media")
