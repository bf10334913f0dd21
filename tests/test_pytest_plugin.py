"""vlm-core's pytest plugin is active in every pytest run of the environment: it must leave that
run's environment as it found it (TRITON_INTERPRET would make a GPU user's Triton tests run
interpreted; HF_HUB_OFFLINE would cut their downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

TOUCHED_BEFORE = ("TRITON_INTERPRET", "HF_HUB_OFFLINE")


def test_third_party_pytest_run_sees_its_environment_unchanged(tmp_path):
    project = tmp_path / "other-project"
    project.mkdir()
    (project / "test_env.py").write_text(
        textwrap.dedent(
            """
        import os

        def test_vlm_plugin_is_active(pytestconfig, tiny_models):
            assert pytestconfig.pluginmanager.has_plugin("vlm")
            assert callable(tiny_models)

        def test_environment_untouched():
            assert "TRITON_INTERPRET" not in os.environ, os.environ["TRITON_INTERPRET"]
            assert "HF_HUB_OFFLINE" not in os.environ, os.environ["HF_HUB_OFFLINE"]
        """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in TOUCHED_BEFORE and not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout
