"""Components built by name, across plugins: the registries are used for real.

- A plugin file that writes no vision code (``fixtures/plugins/vlmtest_borrowed_tower.py``) builds
  an InternVL-shaped model from ``internvl.InternVisionTower`` (another plugin's tower), the core's
  ``LayerNormMLPProjector`` and ``pixel_shuffle``: its greedy tokens and logits equal transformers'
  ``InternVLForConditionalGeneration`` (the conformance kit's parity check, 1e-4).
- ``vlmrun plugins --components`` lists the core's and the plugins' entries without importing torch.
- No vision tower or projector class is written twice in ``core/`` and ``plugins/``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BORROWED = Path(__file__).parent / "fixtures" / "plugins" / "vlmtest_borrowed_tower.py"


@pytest.fixture(scope="module")
def borrowed_plugin():
    spec = importlib.util.spec_from_file_location("vlmtest_borrowed_tower", BORROWED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    from vlm.plugin.manager import reset_registry

    reset_registry()


@pytest.fixture(scope="module")
def internvl_hf_checkpoint(tmp_path_factory):
    from vlm_plugin_internvl.testing import write_tiny_internvl

    return str(write_tiny_internvl(tmp_path_factory.mktemp("borrowed") / "hf", "hf", seed=0))


def test_plugin_file_builds_another_plugins_tower_by_name_and_matches_transformers(
    borrowed_plugin, internvl_hf_checkpoint
):
    from transformers import InternVLForConditionalGeneration

    from vlm.registry import VISION_TOWERS
    from vlm.testing.conformance import Conformance

    kit = Conformance(borrowed_plugin, internvl_hf_checkpoint, InternVLForConditionalGeneration, new_tokens=12)
    kit.check_load_weights()
    tower = kit.model.vision_model
    assert type(tower) is type(VISION_TOWERS.build(dict(type="internvl.InternVisionTower", hf_config=kit.hf_config)))
    assert type(tower).__module__ == "vlm_plugin_internvl.model"
    assert kit.llm.engine.plugin == kit.name  # the borrowing plugin served it, not vlm-plugin-internvl
    assert kit.check_greedy_parity() is True


def test_components_listing_names_core_and_plugin_entries_without_torch():
    code = (
        "import sys\n"
        "from vlm.cli.main import main\n"
        "status = main(['plugins', '--components', '--json'])\n"
        "assert 'torch' not in sys.modules, 'listing imported torch'\n"
        "sys.exit(status)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {(row["registry"], row["scope"], row["name"]): row["location"] for row in json.loads(result.stdout)}
    assert rows[("vision_tower", "vlm", "CLIPVisionTower")] == "vlm.nn.clip:CLIPVisionTower"
    assert rows[("vision_tower", "vlm", "SiglipVisionTower")] == "vlm.nn.clip:CLIPVisionTower"
    assert rows[("vision_tower", "internvl", "InternVisionTower")].startswith("vlm_plugin_internvl.model:")
    assert rows[("vision_tower", "qwen2vl", "Qwen2VisionTower")].startswith("vlm_plugin_qwen2vl.model:")
    assert ("projector", "vlm", "LayerNormMLPProjector") in rows and ("projector", "vlm", "MLPProjector") in rows
    assert ("patch_embedding", "vlm", "ConvPatchEmbedding") in rows
    assert ("activation", "vlm", "quick_gelu") in rows and ("activation", "vlm", "QuickGELU") in rows


def test_get_act_fn_builds_through_the_activation_registry():
    from vlm.nn import get_act_fn
    from vlm.nn.activation import GELU, QuickGELU
    from vlm.registry import ACTIVATIONS

    assert isinstance(get_act_fn("quick_gelu"), QuickGELU)
    assert isinstance(ACTIVATIONS.build(dict(type="QuickGELU")), QuickGELU)
    tanh = get_act_fn("gelu_pytorch_tanh")
    assert isinstance(tanh, GELU) and tanh.approximate == "tanh"
    with pytest.raises(ValueError, match=r"unsupported activation 'nope'; vlm knows .*quick_gelu"):
        get_act_fn("nope")


def _classes_with_forward(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {
        node.name: str(path.relative_to(ROOT))
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(isinstance(n, ast.FunctionDef) and n.name == "forward" for n in node.body)
    }


def test_no_tower_or_projector_is_written_twice():
    """CLIP / SigLIP towers, the MLP projectors and the conv patch embedding live once, in the core."""
    sources = sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "plugins").glob("*/vlm_plugin_*/*.py"))
    shared = ("VisionEmbeddings", "VisionEncoderLayer", "VisionTower", "Projector", "PatchEmbed")
    found: dict[str, list[str]] = {}
    for path in sources:
        for name, where in _classes_with_forward(path).items():
            if any(part in name for part in shared):
                found.setdefault(name, []).append(where)
    assert found, "the scan found no tower classes at all"
    assert not any(len(places) > 1 for places in found.values()), found
    plugin_projectors = [n for n, places in found.items() if "Projector" in n and any("plugins/" in p for p in places)]
    assert not plugin_projectors, f"projectors written in plugins instead of the core's PROJECTORS: {plugin_projectors}"
    for name in ("CLIPVisionTower", "MLPProjector", "LayerNormMLPProjector", "ConvPatchEmbedding"):
        assert name in found and found[name][0].startswith("core/"), (name, found.get(name))
