"""Tiny LLaVA checkpoints shared by this plugin's tests: written once per session (about 0.1 s
each after transformers is imported), one per variant of vlm_plugin_llava.testing.VARIANTS, in the
tensor layout of the llava-hf repos on the Hub."""

from __future__ import annotations

import pytest

from vlm_plugin_llava.testing import VARIANTS, write_tiny_llava


@pytest.fixture(scope="session")
def llava_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llava")
    return {variant: str(write_tiny_llava(root / variant, variant)) for variant in VARIANTS}
