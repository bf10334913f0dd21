"""The hostile command-line corpus (``tests/corpus/cli_cases.jsonl``) against ``vlmrun``.

Each case copies a tiny model (``qwen2`` text-only or ``qwen2_vl``), damages the copy with its
``setup`` steps, runs ``vlmrun`` with its ``argv`` and checks the exit status (1 for vlm's own
errors, 2 for argparse's; ``null``: either) and that stderr holds exactly one ``error:`` line,
naming each of ``mentions``, and no traceback (exit 0: the model was served anyway, and one
``WARNING`` line names each of ``mentions``). Nothing in the corpus may be unpickled. Cases
marked ``subprocess`` run in their own interpreter (plugin files register for the life of a
process); the others call ``vlm.cli.main.main`` in this one.

Setup steps: ``delete:FILE``, ``write:FILE:TEXT``, ``json_set:FILE:KEY=JSON``,
``json_delete:FILE:KEY``, ``truncate:FILE:FRACTION``, ``tensor_drop:SUFFIX``,
``tensor_shape:SUFFIX`` (one row more), ``tensor_add:NAME``, ``tensor_dtype:SUFFIX:DTYPE``,
``tensor_nan:SUFFIX``, ``pickle_payload:FILE`` (a pickle that would create ``PWNED``),
``template:TEXT`` (the chat template, in every place transformers reads one).
Placeholders in argv: ``$MODEL``, ``$MEDIA`` (``tests/corpus/media.py``), ``$PLUGINS``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm.cli.main import main

CORPUS = Path(__file__).parent / "corpus"
CASES = [json.loads(line) for line in (CORPUS / "cli_cases.jsonl").read_text().splitlines() if line.strip()]

_PLUGIN_HEAD = 'from vlm.plugin import Claim, hookimpl\n\nvlm_api_version = ">=1.0,<2"\n\n'
_CLAIM = "@hookimpl\ndef match(hf_config):\n    return Claim(priority=100, reason='always')\n\n"
_ARCHS = "@hookimpl\ndef architectures():\n    return ['Qwen2ForCausalLM']\n\n"
_TEXT = (
    "@hookimpl\ndef build_preprocessor(tokenizer):\n"
    "    from vlm.plugin import TextPreprocessor\n\n    return TextPreprocessor(tokenizer)\n\n"
)
_MODEL = "@hookimpl\ndef build_model(hf_config, dtype, device):\n    return {'not': 'a model'}\n\n"
_RAISE = "    raise KeyError('num_experts')\n\n"
PLUGINS = {
    "raises_in_match": _PLUGIN_HEAD + _ARCHS + "@hookimpl\ndef match(hf_config):\n" + _RAISE + _TEXT,
    "raises_in_build_model": _PLUGIN_HEAD
    + _ARCHS
    + _CLAIM
    + _TEXT
    + "@hookimpl\ndef build_model(hf_config, dtype, device):\n"
    + _RAISE,
    "raises_in_build_preprocessor": _PLUGIN_HEAD
    + _ARCHS
    + _CLAIM
    + "@hookimpl\ndef build_preprocessor(tokenizer):\n"
    + _RAISE,
    "raises_in_architectures": _PLUGIN_HEAD + _CLAIM + _TEXT + "@hookimpl\ndef architectures():\n" + _RAISE,
    "imports_missing": "import vlm_no_such_module_anywhere\n",
    "syntax_error": "def broken(:\n",
    "wants_api_9": _PLUGIN_HEAD.replace(">=1.0,<2", ">=9,<10") + _ARCHS + _CLAIM + _TEXT,
    "returns_garbage": _PLUGIN_HEAD + _ARCHS + _CLAIM + _TEXT + _MODEL,
}


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-corpus-plugins")
    for name, source in PLUGINS.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(scope="module")
def sources(tiny_qwen2, tmp_path_factory) -> dict[str, Path]:
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    vl = write_tiny_qwen2_vl(tmp_path_factory.mktemp("cli-corpus-models") / "qwen2-vl", "qwen2_vl", seed=0)
    return {"qwen2": Path(tiny_qwen2), "qwen2_vl": Path(vl)}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tensor_name(tensors: dict, suffix: str) -> str:
    [name] = [n for n in tensors if n.endswith(suffix)]
    return name


def _apply(model: Path, step: str, marker: Path) -> None:
    op, _, rest = step.partition(":")
    weights = model / "model.safetensors"
    if op == "delete":
        (model / rest).unlink(missing_ok=True)
    elif op == "write":
        name, _, text = rest.partition(":")
        (model / name).write_text(text)
    elif op in ("json_set", "json_delete"):
        name, _, assignment = rest.partition(":")
        config = json.loads((model / name).read_text())
        if op == "json_set":
            key, _, value = assignment.partition("=")
            config[key] = json.loads(value)
        else:
            config.pop(assignment)
        (model / name).write_text(json.dumps(config))
    elif op == "truncate":
        name, _, fraction = rest.partition(":")
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: int(len(data) * float(fraction))])
    elif op.startswith("tensor_"):
        tensors = load_file(str(weights))
        if op == "tensor_add":
            tensors[rest] = torch.zeros(4, 4)
        else:
            suffix, _, dtype = rest.partition(":")
            name = _tensor_name(tensors, suffix)
            if op == "tensor_drop":
                del tensors[name]
            elif op == "tensor_shape":
                tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
            elif op == "tensor_dtype":
                tensors[name] = tensors[name].to(getattr(torch, dtype))
            elif op == "tensor_nan":
                tensors[name] = tensors[name].clone()
                tensors[name][0, 0] = float("nan")
        save_file(tensors, str(weights))
    elif op == "pickle_payload":
        (model / rest).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    elif op == "template":
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = rest
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        (model / "chat_template.jinja").write_text(rest)
    else:
        raise AssertionError(f"unknown setup step {step!r}")


def _argv(case: dict, model: Path, media: Path, plugins: Path) -> list[str]:
    def fill(arg: str) -> str:
        return arg.replace("$MODEL", str(model)).replace("$MEDIA", str(media)).replace("$PLUGINS", str(plugins))

    return [fill(arg) for arg in case["argv"]]


def _run(case: dict, argv: list[str], capsys) -> tuple[int, str]:
    if not case.get("subprocess"):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        return code, capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_cli_case(case, sources, media, plugins, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(sources[case["model"]], model)
    marker = tmp_path / "PWNED"
    for step in case["setup"]:
        _apply(model, step, marker)
    code, err = _run(case, _argv(case, model, media, plugins), capsys)
    expected = (1, 2) if case["exit"] is None else (case["exit"],)
    assert code in expected, (case["id"], code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    if case["exit"] == 0:  # served anyway: a warning names what was skipped
        assert not errors, err[-2000:]
        [warning] = [line for line in err.splitlines() if line.startswith("WARNING")]
        errors = [warning]
    assert len(errors) == 1, (case["id"], err[-2000:])
    for needle in case["mentions"]:
        assert needle in errors[0], (case["id"], needle, errors[0])
    assert not marker.exists() and not (media / "PWNED").exists(), "a corpus file was unpickled"


def test_the_corpus_is_large_and_well_formed():
    assert len(CASES) >= 80 and len({c["id"] for c in CASES}) == len(CASES)
    families = {c["family"] for c in CASES}
    assert {"configs", "weights", "tokenizers", "images", "prompts", "sampling", "plugins"} <= families
