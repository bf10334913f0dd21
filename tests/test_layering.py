"""The import layering the house keeps: each layer imports only the ones below it.

kernels <- nn <- engine; distributed never imports the engine (the driver is handed the engine's
factory), and the plugin facade imports no torch. Checked in fresh interpreters, so nothing this
test process already imported can hide a cycle.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: module -> packages it must not import (directly or through anything it imports)
LAYERS = {
    "vlm.kernels": ["vlm.nn", "vlm.engine", "vlm.distributed.driver", "vlm.plugin", "vlm.server"],
    "vlm.nn": ["vlm.engine", "vlm.distributed.driver", "vlm.plugin.manager", "vlm.server", "vlm.cli"],
    "vlm.distributed.driver": ["vlm.engine", "vlm.llm", "vlm.server"],
    "vlm.plugin": ["torch", "vlm.engine", "vlm.nn"],
    "vlm.inputs": ["torch", "vlm.engine", "vlm.nn"],
    "vlm.platform": ["torch", "vlm.engine", "vlm.nn", "vlm.kernels"],
}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_module_imports_nothing_above_it(module):
    forbidden = LAYERS[module]
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r}))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing {module} imported {result.stdout.strip()}"
