"""The built wheel holds every subpackage of core/ and kernels/ (an editable install would hide a
missing one), and installs the ``vlmrun`` script, the pytest plugin and nothing from the repo root."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    found = set()
    for directory, root_name in (("core", "vlm"), ("kernels", "vlm/kernels")):
        base = ROOT / directory
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base)
            found.add(root_name if str(rel) == "." else f"{root_name}/{rel.as_posix()}")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    [built] = out.glob("vlm_core-*.whl")
    return built


def test_wheel_contains_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert source_packages() <= packages, source_packages() - packages
    assert "vlm/kernels/triton_norm.py" in names and "vlm/nn/linear.py" in names
    # `vlmrun demo` needs no download: the demo model and pictures are package data
    assert "vlm/demo/internvl-shapes/model.safetensors" in names and "vlm/demo/pictures/red_circle.png" in names
    assert not any(n.startswith(("core/", "kernels/", "tests/", "plugins/")) for n in names)


def test_wheel_metadata_declares_script_and_pytest_plugin(wheel):
    archive = zipfile.ZipFile(wheel)
    [entry_points] = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "vlmrun = vlm.cli.main:main" in text
    assert "vlm = vlm.testing.pytest_plugin" in text


def test_wheel_imports_standalone(wheel, tmp_path):
    """Unpacked on its own (no repo on the path), every module imports and the CLI runs."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    code = (
        "import importlib, pkgutil, sys, vlm, vlm.kernels;"
        "assert vlm.__file__.startswith(sys.argv[1]), vlm.__file__;"
        "mods = [m.name for m in pkgutil.walk_packages(vlm.__path__, 'vlm.')];"
        "[importlib.import_module(m) for m in mods if 'triton_' not in m];"
        "print(len(mods))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 20
