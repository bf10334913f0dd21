"""``vlmrun install`` / ``vlmrun uninstall``: pip in vlmrun's own interpreter, without loading plugins."""

from __future__ import annotations

import subprocess
import sys

from vlm.cli import main as cli


def test_install_runs_pip_of_this_interpreter_and_passes_options_through(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["install", "-e", "./my-plugin", "--upgrade"]) == 0
    assert cli.main(["uninstall", "vlm-plugin-broken"]) == 0
    assert calls == [
        [sys.executable, "-m", "pip", "install", "-e", "./my-plugin", "--upgrade"],
        [sys.executable, "-m", "pip", "uninstall", "-y", "vlm-plugin-broken"],
    ]


def test_uninstall_works_when_a_plugin_breaks_start_up(tmp_path):
    """The recovery recipe: a plugin that raises on import cannot stop `vlmrun uninstall`."""
    site = tmp_path / "site"
    (site / "vlmtest_explodes-0.1.dist-info").mkdir(parents=True)
    (site / "vlmtest_explodes-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vlmtest-explodes\nVersion: 0.1\n"
    )
    (site / "vlmtest_explodes-0.1.dist-info" / "entry_points.txt").write_text(
        "[vlm.models]\nexplodes = vlmtest_explodes\n"
    )
    (site / "vlmtest_explodes.py").write_text("raise SystemExit('plugin exploded at import')\n")
    env = {"PYTHONPATH": str(site), "VLM_LOAD_PLUGINS": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", "uninstall", "vlmtest-not-installed"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "not installed" in (result.stdout + result.stderr)


def test_install_without_a_package_is_a_one_line_error(capsys):
    assert cli.main(["install"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "vlmrun install vlm-plugin-internvl" in err and "\n" not in err
