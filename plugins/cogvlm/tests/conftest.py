"""Tiny CogVLM checkpoints shared by this plugin's tests, written once per session: CogVLM2 and
CogVLM 1 in the Hub layout, and the CogVLM 1 weights again in the original SAT layout."""

from __future__ import annotations

import pytest

from vlm_plugin_cogvlm.testing import convert_hub_to_sat, write_tiny_cogvlm


@pytest.fixture(scope="session")
def cogvlm_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cogvlm")
    paths = {variant: str(write_tiny_cogvlm(root / variant, variant)) for variant in ("cogvlm2", "cogvlm")}
    paths["sat"] = str(convert_hub_to_sat(paths["cogvlm"], root / "sat"))
    return paths
