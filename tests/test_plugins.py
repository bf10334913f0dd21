"""The plugin manager: discovery, isolation of broken plugins, selection, files, workers, tracing.

Fake plugins live in ``tests/fixtures/plugins/vlmtest_*.py``. :func:`make_site` installs them as
entry points without pip (a fake ``*.dist-info`` with ``entry_points.txt`` in a directory on
``sys.path``), which is exactly what ``importlib.metadata`` sees for a pip-installed plugin.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm import hookspecs
from vlm.errors import PluginError
from vlm.plugin import manager as plugins
from vlm.plugin.manager import add_plugin_file, get_registry, reset_registry

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
FAKE_CONFIG = SimpleNamespace(architectures=["FakeForCausalLM"], model_type="fake")
VLM_ENV = (plugins.LOAD_PLUGINS_ENV, plugins.PLUGIN_FILES_ENV, plugins.TRACE_PLUGINS_ENV)


def make_site(root: Path, entry_points: dict[str, str]) -> Path:
    """A directory holding one fake distribution per plugin: ``{entry-point name: module}``.

    Each distribution is ``vlmtest-<name>`` version 0.1 with ``[vlm.models] <name> = <module>``.
    """
    root.mkdir(parents=True, exist_ok=True)
    for ep_name, module in entry_points.items():
        shutil.copy(FIXTURES / f"{module}.py", root / f"{module}.py")
        dist = "vlmtest-" + ep_name.replace("_", "-")
        info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[vlm.models]\n{ep_name} = {module}\n")
    return root


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch):
    """A fresh registry and clean VLM_* variables per test; fake plugin modules forgotten after."""
    for var in VLM_ENV:
        # setenv first so that monkeypatch restores (removes) what add_plugin_file sets later
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    reset_registry()
    yield
    reset_registry()
    for name in [m for m in sys.modules if m.startswith(("vlmtest_", "vlm_plugin_file_vlmtest_"))]:
        del sys.modules[name]


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install({ep_name: module})`` puts fake plugin distributions on sys.path; returns the dir."""
    count = 0

    def do(entry_points: dict[str, str]) -> Path:
        nonlocal count
        count += 1
        site = make_site(tmp_path / f"site{count}", entry_points)
        monkeypatch.syspath_prepend(str(site))
        return site

    return do


def names(infos) -> set[str]:
    return {info.name for info in infos}


def build_args(**overrides):
    """Every argument of the build_model hookspec (the core always passes all of them)."""
    return {"hf_config": FAKE_CONFIG, "model_config": None, "dtype": None, "device": None, **overrides}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VLM_ENV}
    env.update(extra)
    return env


# -- 1. a plugin that fails to import ------------------------------------------------------


def test_broken_plugin_is_reported_and_others_still_work(install):
    install({"fake_a": "vlmtest_fake_a", "broken": "vlmtest_broken_import"})
    registry = get_registry()

    [broken] = registry.broken()
    assert broken.name == "broken"
    assert broken.distribution == "vlmtest-broken"
    assert "RuntimeError" in broken.error and "boom: vlmtest_broken_import cannot be imported" in broken.error

    assert {"fake_a", "llama"} <= names(registry.loaded())
    plugin, claims = registry.choose(FAKE_CONFIG)
    assert plugin == "fake_a"
    assert registry.call("fake_a", "build_model", **build_args(dtype="f32"))["built_by"] == "fake_a"
    # the real plugin is untouched by its broken neighbour
    qwen2 = SimpleNamespace(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    assert registry.choose(qwen2)[0] == "llama"


def test_broken_plugin_in_vlmrun_plugins_output(install, capsys):
    from vlm.cli.main import main

    install({"fake_a": "vlmtest_fake_a", "broken": "vlmtest_broken_import"})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = lines.index("broken  [entry point: vlmtest-broken 0.1]")
    assert lines[at + 1] == "  FAILED: import failed: RuntimeError: boom: vlmtest_broken_import cannot be imported"
    assert "fake_a  [entry point: vlmtest-fake-a 0.1]" in out
    assert "architectures: FakeForCausalLM" in out

    reset_registry()
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert "boom" in listed["broken"]["error"]
    assert listed["fake_a"]["error"] is None and listed["fake_a"]["architectures"] == ["FakeForCausalLM"]


def test_no_plugin_claims_a_config_mentions_broken_plugins(install):
    install({"broken": "vlmtest_broken_import"})
    unknown = SimpleNamespace(architectures=["NobodyForCausalLM"], model_type="nobody")
    with pytest.raises(PluginError) as err:
        get_registry().choose(unknown)
    message = str(err.value)
    assert "NobodyForCausalLM" in message and "llama" in message
    assert "broken" in message and "boom" in message  # the likely culprit is named


# -- 2. misspelled hookimpls and bad hookimpl signatures ------------------------------------


def test_misspelled_hookimpl_is_refused_with_its_name(install):
    install({"misspelled": "vlmtest_misspelled"})
    registry = get_registry()
    [info] = registry.broken()
    assert info.name == "misspelled"
    assert "'mach'" in info.error and "misspelled" in info.error
    # the message lists the real hooks, and only those
    listed = info.error.split("the hooks are: ")[1]
    assert listed == "architectures, build_model, build_preprocessor, match, parse_grounding"
    assert "misspelled" not in names(registry.loaded())
    assert registry.pm.get_plugin("misspelled") is None  # not half-registered
    assert all(impl.plugin_name != "misspelled" for impl in registry.pm.hook.architectures.get_hookimpls())


def test_hookimpl_with_argument_not_in_spec_is_refused(install):
    install({"badarg": "vlmtest_badarg"})
    registry = get_registry()
    [info] = registry.broken()
    assert info.name == "badarg"
    assert "rejected" in info.error and "colour" in info.error and "match" in info.error
    assert "\n" not in info.error
    assert registry.pm.get_plugin("badarg") is None
    assert all(impl.plugin_name != "badarg" for impl in registry.pm.hook.architectures.get_hookimpls())
    # its `match` is never asked
    claims = registry.candidates(SimpleNamespace(architectures=["BadArgForCausalLM"], model_type="x"))
    assert claims == []


def test_misspelled_hookimpl_in_plugin_file_is_an_error(tmp_path):
    path = tmp_path / "vlmtest_typo.py"
    path.write_text((FIXTURES / "vlmtest_misspelled.py").read_text())
    add_plugin_file(str(path))
    with pytest.raises(PluginError, match="'mach' matches no vlm hook"):
        get_registry()


# -- 3. VLM_LOAD_PLUGINS -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"fake_a", "fake_b", "llama"}),
        ("", set()),
        ("fake_a,llama", {"fake_a", "llama"}),
        (" fake_b ", {"fake_b"}),
        ("vlmtest-fake-a", {"fake_a"}),  # a distribution name works too
    ],
)
def test_vlm_load_plugins(install, monkeypatch, value, expected):
    install({"fake_a": "vlmtest_fake_a", "fake_b": "vlmtest_fake_b", "broken": "vlmtest_broken_import"})
    if value is not None:
        monkeypatch.setenv("VLM_LOAD_PLUGINS", value)
    registry = get_registry()
    loaded = names(registry.loaded())
    if value is None:  # unset = all, including the broken one (reported)
        assert expected <= loaded
        assert names(registry.broken()) == {"broken"}
    else:
        assert loaded == expected
        assert registry.broken() == []  # not even tried: the recovery recipe for a broken plugin


def test_empty_vlm_load_plugins_lists_nothing(install, monkeypatch, capsys):
    from vlm.cli.main import main

    install({"broken": "vlmtest_broken_import"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "no plugins installed" in out and "VLM_LOAD_PLUGINS" in out
    assert "broken" not in out and "llama" not in out


# -- 4. choosing a plugin ----------------------------------------------------------------


def test_equal_claims_are_an_error_naming_both_and_the_flag(install, monkeypatch):
    install({"fake_a": "vlmtest_fake_a", "fake_b": "vlmtest_fake_b"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a,fake_b")
    registry = get_registry()
    with pytest.raises(PluginError) as err:
        registry.choose(FAKE_CONFIG)
    message = str(err.value)
    assert "'fake_a'" in message and "'fake_b'" in message
    assert "--plugin fake_a" in message and "--plugin fake_b" in message
    # both claims are visible, with the reason given
    claims = {c.plugin: c.claim for c in registry.candidates(FAKE_CONFIG)}
    assert claims == {"fake_a": hookspecs.Claim(reason="fake a serves FakeForCausalLM"), "fake_b": hookspecs.Claim()}


def test_forced_plugin_wins(install, monkeypatch):
    install({"fake_a": "vlmtest_fake_a", "fake_b": "vlmtest_fake_b"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a,fake_b,llama")
    registry = get_registry()
    plugin, claims = registry.choose(FAKE_CONFIG, forced="fake_b")
    assert plugin == "fake_b"
    assert {c.plugin for c in claims} == {"fake_a", "fake_b"}
    assert registry.call(plugin, "build_model", **build_args()) == {"built_by": "fake_b"}
    # forcing works even for a plugin that does not claim the config
    assert registry.choose(FAKE_CONFIG, forced="llama")[0] == "llama"
    with pytest.raises(PluginError, match="--plugin 'nope' is not loaded; loaded plugins: fake_a, fake_b, llama"):
        registry.choose(FAKE_CONFIG, forced="nope")


def test_higher_priority_claim_wins(install, monkeypatch):
    install({"fake_a": "vlmtest_fake_a", "fake_b": "vlmtest_fake_b", "fake_high": "vlmtest_fake_high"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a,fake_b,fake_high")
    registry = get_registry()
    plugin, claims = registry.choose(FAKE_CONFIG)
    assert plugin == "fake_high"
    assert claims[0] == plugins.Candidate("fake_high", hookspecs.Claim(priority=10, reason="optimized fake"))
    assert [c.claim.priority for c in claims] == [10, 0, 0]
    assert registry.call(plugin, "build_model", **build_args()) == {"built_by": "fake_high"}


def test_models_build_model_uses_forced_plugin(install, monkeypatch):
    """``--plugin`` reaches the hook call: only the forced plugin's build_model runs."""
    install({"fake_a": "vlmtest_fake_a", "fake_b": "vlmtest_fake_b"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a,fake_b")
    from vlm.plugin import manager as models

    config = SimpleNamespace(hf_config=FAKE_CONFIG)
    model, name = models.build_model(config, "f32", "meta", plugin="fake_a")
    assert name == "fake_a" and model["built_by"] == "fake_a" and model["dtype"] == "f32"
    with pytest.raises(PluginError, match="both claim this model") as err:
        models.build_model(config, "f32", "meta")
    assert "--plugin fake_a" in str(err.value) and "--plugin fake_b" in str(err.value)


# -- 5. plugins from plain files ----------------------------------------------------------


def test_add_plugin_file(monkeypatch):
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "")  # only the file
    path = FIXTURES / "vlmtest_file_plugin.py"
    add_plugin_file(str(path))
    assert os.environ["VLM_PLUGIN_FILES"] == str(path.resolve())
    registry = get_registry()
    [info] = registry.loaded()
    assert (info.name, info.source, info.location) == ("vlmtest_file_plugin", "file", str(path.resolve()))
    assert info.hooks == ["architectures", "build_model", "match"]
    assert registry.describe()[0].architectures == ["FileForCausalLM"]
    config = SimpleNamespace(architectures=["FileForCausalLM"], model_type="file")
    assert registry.choose(config)[0] == "vlmtest_file_plugin"


def test_plugin_file_cli_flag(capsys):
    from vlm.cli.main import main

    path = FIXTURES / "vlmtest_file_plugin.py"
    assert main(["plugins", "--plugin-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"vlmtest_file_plugin  [file: {path.resolve()}]" in out
    assert "architectures: FileForCausalLM" in out
    assert "llama  [entry point: vlm-plugin-llama 0.1.0]" in out  # files add to entry points


def test_broken_plugin_file_is_a_clear_error(capsys):
    from vlm.cli.main import main

    path = FIXTURES / "vlmtest_broken_file.py"
    assert main(["plugins", "--plugin-file", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: plugin file {str(path)!r} failed to import: ModuleNotFoundError")
    assert "vlmtest_module_that_does_not_exist" in captured.err


def test_missing_plugin_file_is_a_clear_error(tmp_path, capsys):
    from vlm.cli.main import main

    missing = tmp_path / "nope.py"
    assert main(["plugins", "--plugin-file", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: plugin file {str(missing)!r} does not exist; pass the path of a .py file with hookimpls\n"
    # a bad path is not remembered: the process (and its workers) can still load plugins
    with pytest.raises(PluginError):
        add_plugin_file(str(missing))
    assert "VLM_PLUGIN_FILES" not in os.environ
    assert "llama" in names(get_registry().loaded())


def test_plugin_file_with_future_api_is_refused(tmp_path):
    path = tmp_path / "vlmtest_future_file.py"
    path.write_text((FIXTURES / "vlmtest_api_future.py").read_text())
    add_plugin_file(str(path))
    with pytest.raises(PluginError, match=r"vlmtest_future_file.py.*written for vlm plugin API >=2,<3"):
        get_registry()


# -- 6. every process, idempotently --------------------------------------------------------


def _plugins_seen_in_child() -> dict:
    """Runs in a spawned process: what a model-building worker would see."""
    from vlm.plugin.manager import get_registry

    first = get_registry()
    count = len(first.pm.get_plugins())
    second = get_registry()
    return {
        "loaded": {info.name: info.source for info in second.loaded()},
        "same_registry": first is second,
        "registered_twice": len(second.pm.get_plugins()) != count,
        "match_impls": len(second.pm.hook.match.get_hookimpls()),
        "choice": second.choose(SimpleNamespace(architectures=["FileForCausalLM"], model_type="file"))[0],
    }


def test_spawned_worker_sees_the_same_plugins(install, monkeypatch):
    install({"fake_a": "vlmtest_fake_a"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a,llama")
    add_plugin_file(str(FIXTURES / "vlmtest_file_plugin.py"))  # what --plugin-file does
    parent = {info.name: info.source for info in get_registry().loaded()}
    assert parent == {"fake_a": "entry point", "llama": "entry point", "vlmtest_file_plugin": "file"}

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(_plugins_seen_in_child)
    assert child["loaded"] == parent
    assert child["same_registry"] and not child["registered_twice"]
    assert child["match_impls"] == 3
    assert child["choice"] == "vlmtest_file_plugin"


def test_loading_is_idempotent(install):
    install({"fake_a": "vlmtest_fake_a"})
    path = str(FIXTURES / "vlmtest_file_plugin.py")
    add_plugin_file(path)
    first = get_registry()
    plugins_before = set(first.pm.get_plugins())
    impls_before = len(first.pm.hook.match.get_hookimpls())

    add_plugin_file(path)  # again: no duplicate in the environment
    assert os.environ["VLM_PLUGIN_FILES"].split(os.pathsep) == [str(Path(path).resolve())]
    second = get_registry()
    second.load()
    assert second is first
    assert set(second.pm.get_plugins()) == plugins_before
    assert len(second.pm.hook.match.get_hookimpls()) == impls_before
    claims = second.candidates(FAKE_CONFIG)
    assert [c.plugin for c in claims] == ["fake_a"]  # asked once, not once per load

    # a file added after the first load is still picked up by the next get_registry()
    other = FIXTURES / "vlmtest_rival_qwen2.py"
    add_plugin_file(str(other))
    assert "vlmtest_rival_qwen2" in names(get_registry().loaded())
    assert len(get_registry().pm.get_plugins()) == len(plugins_before) + 1


# -- 7. no torch for listing ----------------------------------------------------------------


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env(**env)
    )


def test_vlmrun_plugins_never_imports_torch(install):
    assert importlib.util.find_spec("torch") is not None  # torch is installed; it is just not imported
    site = install({"fake_a": "vlmtest_fake_a", "broken": "vlmtest_broken_import"})
    code = (
        "import sys; from vlm.cli.main import main; rc = main(['plugins', '--json']); "
        "print(rc, 'torch' in sys.modules, file=sys.stderr)"
    )
    proc = _run_python(code, PYTHONPATH=str(site))
    assert proc.stderr.strip().splitlines()[-1] == "0 False", proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listed["llama"]["architectures"] and listed["fake_a"]["architectures"] == ["FakeForCausalLM"]
    assert "boom" in listed["broken"]["error"]

    code = "import sys; from vlm.cli.main import main; rc = main(['plugins']); print(rc, 'torch' in sys.modules, file=sys.stderr)"
    proc = _run_python(code)
    assert proc.stderr.strip().splitlines()[-1] == "0 False", proc.stderr
    assert "llama  [entry point: vlm-plugin-llama 0.1.0]" in proc.stdout


def test_importing_the_llama_plugin_does_not_import_torch():
    proc = _run_python("import sys, vlm_plugin_llama; print(vlm_plugin_llama.architectures(), 'torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False")
    assert "Qwen2ForCausalLM" in proc.stdout


# -- 8. the plugin API version ---------------------------------------------------------------


def test_plugin_for_another_api_version_is_refused(install):
    install({"future": "vlmtest_api_future", "invalid": "vlmtest_api_invalid", "fake_a": "vlmtest_fake_a"})
    registry = get_registry()
    broken = {info.name: info for info in registry.broken()}
    assert set(broken) == {"future", "invalid"}

    future = broken["future"].error
    assert ">=2,<3" in future
    assert f"provides API {hookspecs.API_VERSION}" in future and "supported: >=1.0,<2" in future
    assert broken["future"].api_version == ">=2,<3"

    invalid = broken["invalid"].error
    assert "'version one please' is not a version range" in invalid and "vlm_api_version" in invalid

    # refused plugins are never asked, even though they claim everything
    assert [c.plugin for c in registry.candidates(FAKE_CONFIG)] == ["fake_a"]
    # a compatible declaration is accepted and shown
    assert {i.name: i.api_version for i in registry.loaded()}["llama"] == ">=1.0,<2"


# -- 9. VLM_TRACE_PLUGINS --------------------------------------------------------------------


def test_trace_plugins_prints_hook_calls_to_stderr():
    code = "from vlm.cli.main import main; main(['plugins'])"
    traced = _run_python(code, VLM_TRACE_PLUGINS="1", VLM_LOAD_PLUGINS="llama")
    assert traced.returncode == 0, traced.stderr
    assert "[vlm plugins] architectures({}) -> ['llama']" in traced.stderr
    assert "[vlm plugins] architectures returned [['LlamaForCausalLM'" in traced.stderr
    assert "[vlm plugins]" not in traced.stdout  # stdout stays clean

    quiet = _run_python(code, VLM_LOAD_PLUGINS="llama")
    assert "[vlm plugins]" not in quiet.stderr
    assert quiet.stdout == traced.stdout


def test_trace_plugins_shows_match_arguments_and_claims(install, monkeypatch, capsys):
    install({"fake_a": "vlmtest_fake_a"})
    monkeypatch.setenv("VLM_LOAD_PLUGINS", "fake_a")
    monkeypatch.setenv("VLM_TRACE_PLUGINS", "1")
    get_registry().choose(FAKE_CONFIG)
    err = capsys.readouterr().err
    assert "[vlm plugins] match(" in err and "FakeForCausalLM" in err
    assert "match returned [Claim(priority=0, reason='fake a serves FakeForCausalLM')]" in err


# -- plugins that misbehave after loading ----------------------------------------------------


def test_plugin_whose_hooks_raise_is_reported_not_fatal(install, capsys):
    install({"fake_a": "vlmtest_fake_a", "raising": "vlmtest_raising_match"})
    registry = get_registry()
    assert registry.choose(FAKE_CONFIG)[0] == "fake_a"
    [raising] = [i for i in registry.describe() if i.name == "raising"]
    assert "match hook raised RuntimeError: match exploded" in raising.error
    from vlm.cli.main import main

    assert main(["plugins"]) == 0
    assert "FAILED" in capsys.readouterr().out


def test_plugin_file_named_like_an_entry_point_does_not_hide_it(tmp_path):
    shadow = tmp_path / "llama.py"
    shadow.write_text((FIXTURES / "vlmtest_file_plugin.py").read_text())
    add_plugin_file(str(shadow))
    with pytest.raises(PluginError):
        get_registry()
    registry = get_registry()
    [real] = [i for i in registry.infos.values() if i.name == "llama" and i.source == "entry point"]
    assert real.error is None
    qwen2 = SimpleNamespace(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    assert registry.choose(qwen2)[0] == "llama"
