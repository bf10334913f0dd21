"""The cookiecutter template (plugin-template/) makes a working plugin, and the conformance kit names
the usual mistakes.

1. Rendered with ``--no-input`` (a vision plugin) and with ``kind=llm``, installed (``vlmrun install
   -e``, i.e. pip) into a temporary virtualenv layered on this environment, each generated plugin
   passes its own test suite on the first run, ``vlmrun plugins --json`` lists it, ``vlmrun --model
   <its tiny checkpoint> --prompt hi --max-tokens 4`` runs through it, and ``VLM_LOAD_PLUGINS=''
   vlmrun uninstall`` removes it.
2. A rendered plugin broken in the typical ways (a wrong weight name, a wrong placeholder count, a
   misspelled hook) is reported by the kit / the plugin manager with the message for each.

The temporary virtualenv sees this environment's packages (vlm-core, the first-party plugins,
torch, pytest) through a ``.pth`` file and gets only the rendered plugins installed into it, so
nothing leaks into this environment or into later tests.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vlm.plugin.manager import LOAD_PLUGINS_ENV, PLUGIN_FILES_ENV, TRACE_PLUGINS_ENV, reset_registry

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plugin-template"
HOOKS = ["architectures", "build_model", "build_preprocessor", "match"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would steer plugin loading or imports."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (LOAD_PLUGINS_ENV, PLUGIN_FILES_ENV, TRACE_PLUGINS_ENV, "PYTHONPATH")
    }
    env.update(extra)
    return env


def run(args: list[str], cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean_env(**env)
    )


def check(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def render(output_dir: Path, **context: str) -> Path:
    """``cookiecutter --no-input plugin-template key=value ...``; returns the generated project."""
    config = output_dir / "cookiecutter-config.yaml"  # keep replays and clones out of ~
    config.write_text(f"cookiecutters_dir: {output_dir / 'cookiecutters'}\nreplay_dir: {output_dir / 'replay'}\n")
    before = set(output_dir.iterdir())
    check(
        run(
            [
                sys.executable,
                "-m",
                "cookiecutter",
                "--no-input",
                "--config-file",
                config,
                "-o",
                output_dir,
                TEMPLATE,
                *[f"{k}={v}" for k, v in context.items()],
            ]
        ),
        "cookiecutter",
    )
    [project] = [p for p in set(output_dir.iterdir()) - before if p.is_dir() and p.name.startswith("vlm-plugin-")]
    return project


def layered_venv(path: Path) -> Path:
    """A virtualenv whose site-packages also sees this environment's (through a .pth file)."""
    check(run([sys.executable, "-m", "venv", "--without-pip", path]), "python -m venv")
    python = path / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(check(purelib, "sysconfig").stdout.strip())
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # addsitedir (not a bare path) so that the editable installs' own .pth files are processed too
    (site / "_vlm_parent_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    )
    # the console script pip would write for vlm-core, so that the test runs `vlmrun` itself
    vlmrun = path / "bin" / "vlmrun"
    vlmrun.write_text(f"#!{python}\nimport sys\nfrom vlm.cli.main import main\nsys.exit(main())\n")
    vlmrun.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("template")
    return {"vision": render(out), "llm": render(out, kind="llm", family="myllm", author="Test Author")}


def test_rendered_files(rendered):
    vision, llm = rendered["vision"], rendered["llm"]
    assert vision.name == "vlm-plugin-myvlm" and llm.name == "vlm-plugin-myllm"
    for project, package in ((vision, "vlm_plugin_myvlm"), (llm, "vlm_plugin_myllm")):
        for name in (
            "pyproject.toml",
            "README.md",
            ".github/workflows/test.yml",
            "tests/test_conformance.py",
            f"{package}/__init__.py",
            f"{package}/model.py",
            f"{package}/tiny_checkpoint.py",
        ):
            assert (project / name).is_file(), name
        for path in project.rglob("*"):
            if path.is_file():
                text = path.read_text()
                assert "{{" not in text.replace("${{", "") or path.name == "tiny_checkpoint.py", (
                    f"unrendered Jinja in {path}"
                )
                assert "cookiecutter" not in text, f"unrendered variable in {path}"
        readme = (project / "README.md").read_text()
        assert all(f"### `{hook}(" in readme for hook in HOOKS), "the README explains every hook"
        import yaml

        workflow = yaml.safe_load((project / ".github/workflows/test.yml").read_text())
        steps = " ".join(step.get("run", "") for step in workflow["jobs"]["test"]["steps"])
        assert "pytest" in steps and "pip install -e" in steps
    assert (vision / "vlm_plugin_myvlm/preprocess.py").is_file()
    assert not (llm / "vlm_plugin_myllm/preprocess.py").exists()
    pyproject = (vision / "pyproject.toml").read_text()
    assert '[project.entry-points."vlm.models"]\nmyvlm = "vlm_plugin_myvlm"' in pyproject
    assert "vlm-plugin-llama" in pyproject and "vlm-plugin-llama" not in (llm / "pyproject.toml").read_text()
    assert 'vlm_api_version = ">=1.0,<2"' in (vision / "vlm_plugin_myvlm/__init__.py").read_text()
    assert 'authors = [{ name = "Test Author" }]' in (llm / "pyproject.toml").read_text()


def test_bad_family_name_is_refused(tmp_path):
    result = run(
        [sys.executable, "-m", "cookiecutter", "--no-input", "-o", tmp_path, TEMPLATE, "family=1bad name!"],
        HOME=str(tmp_path),
    )
    assert result.returncode != 0
    assert "must start with a letter" in result.stdout + result.stderr


def test_rendered_plugins_install_pass_their_tests_and_run(rendered, tmp_path):
    venv = layered_venv(tmp_path / "venv")
    python, vlmrun = venv / "bin" / "python", venv / "bin" / "vlmrun"
    # `vlmrun install` is pip in vlmrun's interpreter (offline here: everything else is already there)
    check(
        run(
            [
                vlmrun,
                "install",
                "--no-index",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "-q",
                "-e",
                rendered["vision"],
                "-e",
                rendered["llm"],
            ]
        ),
        "vlmrun install -e",
    )

    listed = {
        p["name"]: p for p in json.loads(check(run([vlmrun, "plugins", "--json"]), "vlmrun plugins --json").stdout)
    }
    for name, kind, architecture in (
        ("myvlm", "vision", "MyvlmForConditionalGeneration"),
        ("myllm", "llm", "MyllmForCausalLM"),
    ):
        info = listed[name]
        assert info["error"] is None, info
        assert info["distribution"] == f"vlm-plugin-{name}" and info["source"] == "entry point"
        assert info["architectures"] == [architecture] and info["hooks"] == HOOKS
        assert info["api_version"] == ">=1.0,<2"

        project = rendered[kind]
        tests = run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / ('pytest-' + name)}"],
            cwd=project,
        )
        check(tests, f"the generated test suite of {project.name}")
        assert "13 passed" in tests.stdout, tests.stdout[-2000:]

        checkpoint = tmp_path / f"tiny-{name}"
        check(run([python, "-m", f"vlm_plugin_{name}.tiny_checkpoint", checkpoint]), "tiny_checkpoint")
        result = check(
            run(
                [
                    vlmrun,
                    "--model",
                    checkpoint,
                    "--prompt",
                    "hi",
                    "--max-tokens",
                    "4",
                    "--temperature",
                    "0",
                    "--threads",
                    "1",
                ],
                **{TRACE_PLUGINS_ENV: "1"},
            ),
            f"vlmrun --model {checkpoint}",
        )
        # VLM_TRACE_PLUGINS shows which plugin each hook call went to
        call = r"\[vlm plugins\] build_model\(\{{'hf_config': {config}(?:(?!\[vlm plugins\]).)*\) -> \['{plugin}'\]"
        own = call.format(config=rf"RawConfig\(model_type='{name}'", plugin=name)
        assert re.search(own, result.stderr, re.S), result.stderr[-3000:]
        if kind == "vision":  # the language model of its Qwen2 text config came from the llama plugin
            assert re.search(call.format(config="Qwen2Config", plugin="llama"), result.stderr, re.S), result.stderr[
                -3000:
            ]

    # the recovery recipe uninstalls without loading any plugin
    check(run([vlmrun, "uninstall", "vlm-plugin-myllm"], **{LOAD_PLUGINS_ENV: ""}), "vlmrun uninstall")
    listed = {p["name"] for p in json.loads(check(run([vlmrun, "plugins", "--json"]), "vlmrun plugins --json").stdout)}
    assert "myvlm" in listed and "myllm" not in listed

    # nothing was installed into this environment
    from importlib.metadata import distributions

    assert not {"vlm-plugin-myvlm", "vlm-plugin-myllm"} & {d.metadata["Name"] for d in distributions()}


# -- the kit names the usual mistakes ---------------------------------------------------------


def _render_broken(
    tmp_path: Path, family: str, file: str, old: str, new: str, count: int | None = None
) -> tuple[str, str]:
    """Render the vision template as ``family`` and replace ``old`` with ``new`` in one file;
    returns the project directory and the package name."""
    from cookiecutter.main import cookiecutter

    config = tmp_path / "cookiecutter-config.yaml"  # keep replays and clones out of ~
    config.write_text(f"cookiecutters_dir: {tmp_path / 'cookiecutters'}\nreplay_dir: {tmp_path / 'replay'}\n")
    project = Path(
        cookiecutter(
            str(TEMPLATE),
            no_input=True,
            output_dir=str(tmp_path),
            extra_context={"family": family},
            config_file=str(config),
        )
    )
    package = f"vlm_plugin_{family}"
    path = project / package / file
    text = path.read_text()
    assert old in text and (count is None or text.count(old) == count), f"the template no longer has {old!r} in {file}"
    path.write_text(text.replace(old, new))
    return str(project), package


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """``broken(family, file, old, new)`` -> (the imported broken plugin module, its tiny checkpoint)."""
    from vlm.testing.conformance import Conformance

    loaded: list[str] = []
    reset_registry()

    def make(family: str, file: str, old: str, new: str, count: int | None = None) -> Conformance:
        project, package = _render_broken(tmp_path, family, file, old, new, count)
        monkeypatch.syspath_prepend(project)
        loaded.append(package)
        module = importlib.import_module(package)
        checkpoint = importlib.import_module(f"{package}.tiny_checkpoint").write_tiny_checkpoint(
            tmp_path / f"tiny-{family}"
        )
        return Conformance(module, checkpoint)

    yield make
    reset_registry()
    for name in [m for m in sys.modules if m.split(".")[0] in loaded]:
        del sys.modules[name]


def test_kit_reports_a_wrong_weight_name(broken):
    """The model calls the projector's first layer ``fc_in``; the checkpoint says ``linear_1``."""
    from vlm.testing.conformance import ConformanceError

    conformance = broken("brokenweights", "model.py", "linear_1", "fc_in", count=2)
    conformance.check_plugin_loads()
    with pytest.raises(ConformanceError) as info:
        conformance.check_load_weights()
    message = str(info.value)
    assert (
        "load_weights left these checkpoint tensors unused: projector.linear_1.bias, projector.linear_1.weight; "
        "map them in load_weights"
    ) in message
    assert "these model parameters got no checkpoint tensor: projector.fc_in.weight, projector.fc_in.bias" in message


def test_kit_reports_a_wrong_placeholder_count(broken):
    """The preprocessor expands an image to one placeholder fewer than the model's features."""
    from vlm.testing.conformance import ConformanceError

    conformance = broken(
        "brokenplaceholders",
        "preprocess.py",
        "IMAGE_TOKEN * image.num_tokens",
        "IMAGE_TOKEN * (image.num_tokens - 1)",
        count=1,
    )
    with pytest.raises(ConformanceError) as info:
        conformance.check_images()
    assert re.match(
        r"for a 1x1 RGB image the prompt holds 3 placeholder tokens \(id \d+\) but ImageInput.num_tokens adds up to 4; "
        r"expand each image's placeholder to exactly num_tokens tokens",
        str(info.value),
    ), info.value


def test_kit_reports_a_model_that_disagrees_with_the_placeholder_count(broken):
    """``tokens_per_image`` forgets the 2x2 patch merge: 16 placeholders, 4 features per image."""
    from vlm.testing.conformance import ConformanceError

    conformance = broken(
        "brokenfeatures", "model.py", "return (self.grid // self.merge_size) ** 2", "return self.grid**2"
    )
    with pytest.raises(ConformanceError) as info:
        conformance.check_images()
    assert str(info.value).startswith(
        "for a 1x1 RGB image the preprocessor announces 16 placeholder tokens (ImageInput.num_tokens) but "
        "embed_images returns (4, 64) features; the preprocessor must expand the image placeholder to exactly as "
        "many tokens as the model makes features of those pixels"
    ), info.value


def test_plugin_manager_reports_a_misspelled_hook(broken):
    from vlm.testing.conformance import ConformanceError

    conformance = broken("brokenhook", "__init__.py", "def build_preprocessor(", "def build_preprocesor(", count=1)
    with pytest.raises(ConformanceError) as info:
        conformance.check_plugin_loads()
    message = str(info.value)
    assert message.startswith(
        "the plugin manager refused plugin 'vlm_plugin_brokenhook': hookimpl 'build_preprocesor' "
        "matches no vlm hook (misspelled?); the hooks are: architectures, build_model, "
        "build_preprocessor, match"
    ), message
