"""docs/writing-a-plugin.md stays true to the contract (as datasette checks its plugin hooks docs).

- Every hookspec in vlm.hookspecs is documented with its exact signature: a ```python block
  holding ``@hookspec`` (or ``@hookspec(firstresult=True)``) over ``def <hook>(...) -> ...: ...``.
  Names, parameters, annotations, return annotation and ``firstresult`` must equal the spec's.
- Every hook has a test of its own: a ``test_hook_<name>`` function somewhere in the test suite.
- The guide mentions every ``vlm.nn`` building block and every conformance check, and its Python
  blocks parse.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from vlm import hookspecs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-a-plugin.md"
TEST_DIRS = [ROOT / "tests", *sorted((ROOT / "plugins").glob("*/tests"))]


def hookspec_functions() -> dict[str, object]:
    """name -> function for every hookspec (pluggy marks them with a ``vlm_spec`` attribute)."""
    return {name: f for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "vlm_spec")}


def spec_signature(function) -> dict:
    signature = inspect.signature(function)  # annotations stay strings: hookspecs uses postponed evaluation
    return {
        "params": [
            (
                p.name,
                str(p.kind),
                None if p.annotation is inspect.Parameter.empty else p.annotation,
                None if p.default is inspect.Parameter.empty else repr(p.default),
            )
            for p in signature.parameters.values()
        ],
        "returns": None if signature.return_annotation is inspect.Signature.empty else signature.return_annotation,
        "firstresult": bool(function.vlm_spec.get("firstresult")),
    }


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def _normal(text: str | None) -> str | None:
    return None if text is None else ast.unparse(ast.parse(text, mode="eval"))


def documented_signatures(markdown: str) -> dict[str, list[dict]]:
    """hook name -> the signatures of every ``@hookspec``-decorated function in the guide's code."""
    found: dict[str, list[dict]] = {}
    for block in python_blocks(markdown):
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [d for d in node.decorator_list if _decorator_name(d) == "hookspec"]
            if not decorators:
                continue
            firstresult = any(
                isinstance(d, ast.Call)
                and any(k.arg == "firstresult" and ast.literal_eval(k.value) for k in d.keywords)
                for d in decorators
            )
            args = node.args
            kinds = [(a, "POSITIONAL_ONLY") for a in args.posonlyargs] + [
                (a, "POSITIONAL_OR_KEYWORD") for a in args.args
            ]
            kinds += [(a, "KEYWORD_ONLY") for a in args.kwonlyargs]
            positional_defaults = [None] * (len(args.posonlyargs) + len(args.args) - len(args.defaults)) + list(
                args.defaults
            )
            defaults = positional_defaults + list(args.kw_defaults)
            params = [
                (
                    a.arg,
                    kind,
                    ast.unparse(a.annotation) if a.annotation else None,
                    repr(ast.literal_eval(default)) if default is not None else None,
                )
                for (a, kind), default in zip(kinds, defaults)
            ]
            found.setdefault(node.name, []).append(
                {
                    "params": params,
                    "returns": ast.unparse(node.returns) if node.returns else None,
                    "firstresult": firstresult,
                }
            )
    return found


def _decorator_name(node: ast.expr) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def _normalised(signature: dict) -> dict:
    return {
        "params": [
            (name, kind, _normal(annotation), default) for name, kind, annotation, default in signature["params"]
        ],
        "returns": _normal(signature["returns"]),
        "firstresult": signature["firstresult"],
    }


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_hookspecs_are_found():
    assert set(hookspec_functions()) >= {"architectures", "match", "build_preprocessor", "build_model"}


@pytest.mark.parametrize("hook", sorted(hookspec_functions()))
def test_every_hookspec_is_documented_with_its_exact_signature(guide, hook):
    documented = documented_signatures(guide).get(hook)
    assert documented, (
        f"hook {hook!r} is not documented in {GUIDE.relative_to(ROOT)}: add a ```python block with "
        f"@hookspec over `def {hook}(...)` as in core/hookspecs.py, and explain its arguments and return"
    )
    function = hookspec_functions()[hook]
    expected = _normalised(spec_signature(function))
    spec_text = (
        f"@hookspec{'(firstresult=True)' if expected['firstresult'] else ''} def {hook}{inspect.signature(function)}"
    )
    for signature in documented:
        assert _normalised(signature) == expected, (
            f"the documented signature of {hook!r} differs from core/hookspecs.py ({spec_text}); update the guide"
        )
    assert re.search(rf"^#+ `{hook}\(", guide, re.M), f"the guide has no section headed `{hook}(...)`"


def test_no_documented_hookspec_is_stale(guide):
    stale = set(documented_signatures(guide)) - set(hookspec_functions())
    assert not stale, f"the guide documents hooks that core/hookspecs.py does not have: {sorted(stale)}"


def test_every_hook_has_a_test_of_its_own():
    tests = set()
    for directory in TEST_DIRS:
        for path in directory.rglob("test_*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                    tests.add(node.name)
    missing = [hook for hook in sorted(hookspec_functions()) if f"test_hook_{hook}" not in tests]
    assert not missing, (
        f"hooks without a test of their own: {missing}; add test_hook_<name> functions (see tests/test_conformance_kit.py)"
    )


def test_the_checks_above_catch_a_drifted_signature():
    """The comparison is not vacuous: a changed parameter, annotation, return or firstresult differs."""
    spec = _normalised(spec_signature(hookspecs.build_model))
    base = (
        "@hookspec(firstresult=True)\ndef build_model(hf_config: Any, model_config: ModelConfig, "
        "dtype: torch.dtype, device: torch.device) -> torch.nn.Module: ..."
    )
    assert _normalised(documented_signatures(f"```python\n{base}\n```\n")["build_model"][0]) == spec
    for drifted in (
        base.replace("dtype: torch.dtype, ", ""),
        base.replace("device: torch.device", "device: str"),
        base.replace("-> torch.nn.Module", "-> object"),
        base.replace("(firstresult=True)", ""),
    ):
        assert _normalised(documented_signatures(f"```python\n{drifted}\n```\n")["build_model"][0]) != spec


def test_every_vlm_nn_block_is_in_the_guide(guide):
    import vlm.nn

    missing = [name for name in vlm.nn.__all__ if not re.search(rf"\b{name}\b", guide)]
    assert not missing, f"vlm.nn exports {missing}, which the guide's building-block table does not mention"


def test_every_conformance_check_is_in_the_guide(guide):
    from vlm.testing.conformance import CHECKS

    missing = [check for check in CHECKS if f"`{check}`" not in guide]
    assert not missing, f"conformance checks missing from the guide's table: {missing}"


def test_python_blocks_parse(guide):
    for block in python_blocks(guide):
        ast.parse(block)


#: What plugin code may import from vlm-core: the plugin facade, the model blocks, and (in test
#: helpers) the testing kit. Everything else in ``vlm`` may move between releases.
PLUGIN_SURFACE = ("vlm.plugin", "vlm.nn", "vlm.testing")


def _core_imports(path: Path) -> list[str]:
    """Modules of ``vlm`` a source file imports (a regex: the template's files hold Jinja)."""
    found = []
    for match in re.finditer(
        r"^\s*(?:from\s+(vlm(?:\.[\w.]+)?)\s+import\s+(\w+)|import\s+(vlm(?:\.[\w.]+)?))", path.read_text(), re.M
    ):
        module = match.group(1) or match.group(3)
        found.append(f"vlm.{match.group(2)}" if module == "vlm" else module)
    return found


def test_plugins_import_only_the_plugin_facade_and_vlm_nn():
    template = ROOT / "plugin-template" / "{{cookiecutter.project_slug}}" / "{{cookiecutter.__package}}"
    sources = [*sorted((ROOT / "plugins").glob("*/vlm_plugin_*/*.py")), *sorted(template.glob("*.py"))]
    assert len(sources) >= 12 and sum(len(_core_imports(path)) for path in sources) >= 20
    outside = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sources
        for module in _core_imports(path)
        if not any(module == allowed or module.startswith(allowed + ".") for allowed in PLUGIN_SURFACE)
    }
    assert not outside, f"plugin code imports core modules outside {PLUGIN_SURFACE}: {sorted(outside)}"


def test_plugin_facade_imports_no_torch():
    code = "import sys, vlm.plugin; assert 'torch' not in sys.modules, 'vlm.plugin imported torch'"
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_guide_documents_every_registry_core_component_and_config_builder():
    from vlm import registry

    guide = GUIDE.read_text()
    roots = [name for name, value in vars(registry).items() if isinstance(value, registry.Registry)]
    assert len(roots) == len(registry.ROOT_REGISTRIES)
    missing = [name for name in roots if f"`{name}`" not in guide]
    for root in (registry.VISION_TOWERS, registry.PROJECTORS, registry.PATCH_EMBEDDINGS):
        missing += [name for name in root.module_dict if f"`{name}`" not in guide]
    missing += [m for m in ("ConfigBuilder", "condition(hf_config)", "build_model_config") if m not in guide]
    assert not missing, f"the guide's registry / config-builder sections do not mention {missing}"


def test_guide_documents_the_whole_image_prompt_preprocessor_api():
    from vlm.inputs.preprocessor import ImagePromptPreprocessor

    guide = GUIDE.read_text()
    members = [n for n in vars(ImagePromptPreprocessor) if not n.startswith("_") or n in ("__init__", "__call__")]
    undocumented = [n for n in members if f"`{n}" not in guide]
    assert not undocumented, f"ImagePromptPreprocessor members missing from the guide: {undocumented}"
