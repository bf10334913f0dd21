"""vlm.registry: registration, scoped lookup, lazy locations and entries, build, describe.

Every test uses its own root registries, so nothing leaks into the module-level roots.
"""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vlm.errors import VlmError
from vlm.registry import (
    ACTIVATIONS,
    CONFIG_BUILDERS,
    PATCH_EMBEDDINGS,
    PROJECTORS,
    ROOT_REGISTRIES,
    VISION_TOWERS,
    Registry,
    RegistryError,
    describe,
)


class Alpha:
    def __init__(self, dim: int = 1, **extra: Any) -> None:
        self.dim = dim
        self.extra = extra


class Beta:
    pass


def gelu(x: float = 0.0) -> str:
    return f"gelu({x})"


class Boom:
    def __init__(self, **kwargs: Any) -> None:
        raise ValueError("bad dim\nsecond line of detail")


def where(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


_counter = itertools.count()


@pytest.fixture
def make_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], str]]:
    """Writes a uniquely named package on sys.path; ``{pkg}`` in sources is its name."""
    names: list[str] = []

    def make(files: dict[str, str]) -> str:
        pkg = f"vlm_test_regpkg_{next(_counter)}"
        root = tmp_path / pkg
        root.mkdir()
        (root / "__init__.py").write_text("")
        for filename, source in files.items():
            (root / filename).write_text(textwrap.dedent(source).replace("{pkg}", pkg))
        names.append(pkg)
        return pkg

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[module]


def test_module_roots_exist_with_scope_vlm() -> None:
    assert ROOT_REGISTRIES[:5] == (VISION_TOWERS, PROJECTORS, PATCH_EMBEDDINGS, ACTIVATIONS, CONFIG_BUILDERS)
    assert [r.name for r in ROOT_REGISTRIES] == [
        "vision_tower",
        "projector",
        "patch_embedding",
        "activation",
        "config_builder",
        "function_rewriter",  # vlm.rewrite's, one per kind
        "module_rewriter",
        "symbolic_rewriter",
    ]
    assert all(r.scope == "vlm" and r.parent is None and r.root is r for r in ROOT_REGISTRIES)
    assert issubclass(RegistryError, VlmError)


def test_register_decorator_and_call_forms() -> None:
    reg = Registry("thing")

    @reg.register_module()
    class Plain:
        pass

    @reg.register_module(name="Named")
    def fn() -> int:
        return 1

    assert reg.register_module(module=Alpha) is Alpha
    assert reg.register_module(name="act", module=gelu) is gelu
    assert reg.get("Plain") is Plain and reg.get("Named") is fn
    assert reg.get("Alpha") is Alpha and reg.get("act") is gelu
    assert "fn" not in reg and len(reg) == 4


def test_aliases_register_every_name() -> None:
    reg = Registry("thing")
    reg.register_module(name=["A", "B"])(Alpha)
    assert reg.get("A") is reg.get("B") is Alpha
    assert list(reg.module_dict) == ["A", "B"]


def test_taken_name_names_both_owners_unless_forced() -> None:
    reg = Registry("thing")
    reg.register_module(name="X", module=Alpha)
    reg.register_module(name="X", module=Alpha)  # the same object again: not a conflict
    with pytest.raises(RegistryError) as info:
        reg.register_module(name="X", module=Beta)
    message = str(info.value)
    assert "'X'" in message and where(Alpha) in message and where(Beta) in message and "force=True" in message
    assert "\n" not in message and reg.get("X") is Alpha
    with pytest.raises(RegistryError, match="already registered"):
        reg.register_module(name=["Y", "X"], module=Beta)
    assert "Y" not in reg  # nothing registered when one alias is taken
    reg.register_module(name="X", force=True, module=Beta)
    assert reg.get("X") is Beta


@pytest.mark.parametrize(
    ("module", "name", "match"),
    [
        (42, None, "can register a class, a function"),
        (Alpha(), "obj", "can register a class, a function"),
        ("no_colon_here", "X", "package.module:attr"),
        ("pkg.mod:Thing", None, "needs name="),
        (Alpha, [], "name= must be"),
    ],
)
def test_invalid_registrations(module: Any, name: Any, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        Registry("thing").register_module(name=name, module=module)


def test_tree_scopes_and_inherited_build_func() -> None:
    def build_func(cfg: dict[str, Any], registry: Registry, **default_args: Any) -> str:
        return "built"

    root = Registry("thing", build_func=build_func)
    child = Registry("thing", parent=root, scope="plug")
    grandchild = Registry("thing", parent=child, scope="deep")
    assert root.scope == "vlm" and child.parent is root and root.children == {"plug": child}
    assert grandchild.root is root and child.children["deep"] is grandchild
    assert grandchild.build_func is build_func
    with pytest.raises(RegistryError, match="needs scope="):
        Registry("thing", parent=root)
    with pytest.raises(RegistryError, match="scope 'plug' is already a child of the thing registry"):
        Registry("other", parent=root, scope="plug")


def test_get_falls_back_to_the_parent_chain() -> None:
    root = Registry("thing")
    child = Registry("thing", parent=root, scope="plug")
    grandchild = Registry("thing", parent=child, scope="deep")
    root.register_module(module=Alpha)
    child.register_module(name="Alpha", module=Beta)  # a child may shadow its parent
    assert grandchild.get("Alpha") is Beta and root.get("Alpha") is Alpha
    assert grandchild.get("vlm.Alpha") is Alpha


def test_scoped_get_to_self_sibling_and_grandchild() -> None:
    root = Registry("thing")
    left = Registry("thing", parent=root, scope="left")
    right = Registry("thing", parent=root, scope="right")
    deep = Registry("thing", parent=left, scope="deep")
    left.register_module(module=Alpha)
    right.register_module(module=Beta)
    deep.register_module(module=gelu)
    assert left.get("left.Alpha") is Alpha
    assert left.get("right.Beta") is Beta  # a sibling, found through the root
    assert root.get("deep.gelu") is gelu and right.get("deep.gelu") is gelu
    assert root.get("deep.Alpha") is Alpha  # the found registry's own fallback applies


def test_unknown_scope_and_unknown_name_errors() -> None:
    root = Registry("thing")
    Registry("thing", parent=root, scope="plug")
    for name in ["Alpha", "Alpine", *[f"n{i}" for i in range(12)]]:
        root.register_module(name=name, module=Alpha)
    with pytest.raises(RegistryError, match="no registry has scope 'nowhere'") as info:
        root.get("nowhere.Alpha")
    assert "vlm, plug" in str(info.value)
    with pytest.raises(RegistryError) as info:
        root.get("Alpah")
    message = str(info.value)
    assert "thing registry (scope 'vlm')" in message and "'Alpah'" in message
    assert "did you mean 'Alpha'?" in message and "(+4 more)" in message and "\n" not in message
    with pytest.raises(RegistryError, match="must be a string"):
        root.get(Alpha)  # type: ignore[arg-type]


def test_on_missing_scope_hook_is_called_once_per_missing_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Registry("thing")
    calls: list[int] = []

    def load_plugins() -> None:
        calls.append(1)
        if "late" not in root.children:
            Registry("thing", parent=root, scope="late").register_module(module=Alpha)

    monkeypatch.setattr(Registry, "on_missing_scope", load_plugins)
    assert root.get("late.Alpha") is Alpha and len(calls) == 1
    assert root.get("late.Alpha") is Alpha and len(calls) == 1  # the scope exists now
    with pytest.raises(RegistryError, match="no registry has scope 'never'"):
        root.get("never.Alpha")
    assert len(calls) == 2


def test_locations_are_imported_the_first_time_a_name_is_missing(make_pkg: Callable[[dict[str, str]], str]) -> None:
    pkg = make_pkg(
        {
            "registries.py": """
                from vlm.registry import Registry
                REG = Registry("thing", locations=["{pkg}.towers"])
            """,
            "towers.py": """
                from {pkg}.registries import REG
                @REG.register_module()
                class Tower:
                    pass
            """,
        }
    )
    reg = importlib.import_module(f"{pkg}.registries").REG
    reg.register_module(module=Alpha)
    assert reg.get("Alpha") is Alpha and "Tower" not in reg
    assert f"{pkg}.towers" not in sys.modules  # a name that is present imports nothing
    assert reg.get("Tower").__module__ == f"{pkg}.towers"
    assert f"{pkg}.towers" in sys.modules
    with pytest.raises(RegistryError, match="'Missing'"):
        reg.get("Missing")


def test_a_failing_location_is_one_line(make_pkg: Callable[[dict[str, str]], str]) -> None:
    pkg = make_pkg({"broken.py": "raise RuntimeError('no luck\\nmore')"})
    reg = Registry("thing", locations=[f"{pkg}.broken"])
    with pytest.raises(RegistryError) as info:
        reg.get("Anything")
    assert str(info.value).endswith(
        f"could not import location '{pkg}.broken' while looking up 'Anything': RuntimeError: no luck"
    )


def test_lazy_entries_are_imported_on_get_and_cached(make_pkg: Callable[[dict[str, str]], str]) -> None:
    pkg = make_pkg({"heavy.py": "class Heavy:\n    class Inner:\n        pass\n"})
    reg = Registry("thing")
    reg.register_module(name="Heavy", module=f"{pkg}.heavy:Heavy")
    reg.register_module(name="Inner", module=f"{pkg}.heavy:Heavy.Inner")
    assert "Heavy" in reg and len(reg) == 2 and reg.module_dict["Heavy"] == f"{pkg}.heavy:Heavy"
    assert "(lazy)" in repr(reg) and describe([reg])[0]["location"] == f"{pkg}.heavy:Heavy"
    assert f"{pkg}.heavy" not in sys.modules
    heavy = reg.get("Heavy")
    assert heavy.__name__ == "Heavy" and f"{pkg}.heavy" in sys.modules
    assert reg.module_dict["Heavy"] is heavy and reg.get("Inner") is heavy.Inner
    assert reg.build({"type": "Heavy"}).__class__ is heavy


def test_lazy_entry_replaced_by_its_own_registration(make_pkg: Callable[[dict[str, str]], str]) -> None:
    pkg = make_pkg(
        {
            "registries.py": "from vlm.registry import Registry\nREG = Registry('thing')\n",
            "tower.py": """
                from {pkg}.registries import REG
                @REG.register_module()
                class Tower:
                    pass
            """,
        }
    )
    reg = importlib.import_module(f"{pkg}.registries").REG
    reg.register_module(name="Tower", module=f"{pkg}.tower:Tower")  # what a torch-free __init__ does
    tower = reg.get("Tower")
    assert where(tower) == f"{pkg}.tower:Tower"
    reg.register_module(name="Tower", module=f"{pkg}.tower:Tower")  # a second load keeps the object
    assert reg.module_dict["Tower"] is tower


def test_lazy_entry_errors_are_one_line(make_pkg: Callable[[dict[str, str]], str]) -> None:
    pkg = make_pkg({"bad.py": "raise ImportError('needs torch\\ninstall it')", "const.py": "VALUE = 3\n"})
    reg = Registry("thing")
    reg.register_module(name="Gone", module="vlm_no_such_package_xyz.mod:Thing")
    reg.register_module(name="Bad", module=f"{pkg}.bad:Thing")
    reg.register_module(name="NoAttr", module=f"{pkg}.const:Missing")
    reg.register_module(name="Const", module=f"{pkg}.const:VALUE")
    cases = {
        "Gone": "'Gone' -> 'vlm_no_such_package_xyz.mod:Thing' could not be imported: ModuleNotFoundError: No module named",
        "Bad": "could not be imported: ImportError: needs torch",
        "NoAttr": "could not be imported: AttributeError:",
        "Const": "is a int, not a class or function",
    }
    for name, expected in cases.items():
        with pytest.raises(RegistryError) as info:
            reg.get(name)
        assert expected in str(info.value) and "\n" not in str(info.value)
        assert "install it" not in str(info.value)


def test_build_by_name_scoped_name_and_object() -> None:
    root = Registry("thing")
    child = Registry("thing", parent=root, scope="plug")
    child.register_module(module=Alpha)
    root.register_module(module=gelu)
    assert child.build({"type": "Alpha", "dim": 3}).dim == 3
    assert root.build({"type": "plug.Alpha"}).dim == 1
    assert root.build({"type": Beta}).__class__ is Beta
    assert child.build({"type": "gelu", "x": 2}) == "gelu(2)"  # found in the parent


def test_build_default_args_fill_missing_keys_without_mutating_cfg() -> None:
    reg = Registry("thing")
    reg.register_module(module=Alpha)
    cfg = {"type": "Alpha", "dim": 5}
    built = reg.build(cfg, dim=7, extra_key="x")
    assert built.dim == 5 and built.extra == {"extra_key": "x"}
    assert cfg == {"type": "Alpha", "dim": 5}
    assert reg.build({}, type="Alpha").dim == 1  # as in mmengine, default_args may give the type


def test_build_with_custom_build_func() -> None:
    seen: list[tuple[dict[str, Any], Registry, dict[str, Any]]] = []

    def build_func(cfg: dict[str, Any], registry: Registry, **default_args: Any) -> str:
        seen.append((cfg, registry, default_args))
        cfg["mutated"] = True
        return "custom"

    reg = Registry("thing", build_func=build_func)
    cfg = {"type": "Anything"}
    assert reg.build(cfg, dim=2) == "custom"
    assert seen == [({"type": "Anything", "mutated": True}, reg, {"dim": 2})] and cfg == {"type": "Anything"}


@pytest.mark.parametrize("cfg", [{"dim": 3}, ["type", "Alpha"], None])
def test_build_needs_a_dict_with_type(cfg: Any) -> None:
    with pytest.raises(RegistryError, match="'type'"):
        Registry("thing").build(cfg)


def test_build_errors_are_wrapped_in_one_line() -> None:
    reg = Registry("thing")
    reg.register_module(module=Boom)
    reg.register_module(module=Alpha)
    with pytest.raises(RegistryError) as info:
        reg.build({"type": "Boom"})
    assert str(info.value) == "thing could not build type='Boom': ValueError: bad dim"
    assert isinstance(info.value.__cause__, ValueError)
    reg.register_module(module=Beta)
    with pytest.raises(RegistryError, match=r"could not build type='Beta': TypeError: Beta\(\) takes no arguments$"):
        reg.build({"type": "Beta", "oops": 1})
    with pytest.raises(RegistryError, match="nothing is registered as 'Nope'"):
        reg.build({"type": "Nope"})  # an unknown name is not re-wrapped
    with pytest.raises(RegistryError, match="type must be a name, class or function"):
        reg.build({"type": 3})


def test_contains_len_module_dict_and_repr() -> None:
    root = Registry("thing")
    child = Registry("thing", parent=root, scope="plug")
    root.register_module(module=Alpha)
    child.register_module(name="lazy", module="vlm_no_such_package_xyz:Thing")
    assert "Alpha" in root and "vlm.Alpha" in root and "Alpha" in child  # through the parent
    assert "plug.lazy" in root and "lazy" not in root and "nowhere.Alpha" not in root and 3 not in root
    assert "vlm_no_such_package_xyz" not in sys.modules
    assert len(root) == 1 and len(child) == 1
    assert root.module_dict == {"Alpha": Alpha}
    text = repr(root)
    assert "name='thing'" in text and "scope='vlm'" in text and "Alpha" in text and where(Alpha) in text
    assert "children: plug" in text
    assert "lazy" in repr(child) and "vlm_no_such_package_xyz:Thing (lazy)" in repr(child)


def test_describe_lists_every_entry_without_importing() -> None:
    towers = Registry("vision_tower")
    acts = Registry("activation")
    plug = Registry("vision_tower", parent=towers, scope="plug")
    towers.register_module(module=Alpha)
    plug.register_module(name=["Beta", "B"], module=Beta)
    plug.register_module(name="Lazy", module="vlm_no_such_package_xyz.mod:Lazy")
    acts.register_module(module=gelu)
    assert describe([towers, acts]) == [
        {"registry": "vision_tower", "scope": "vlm", "name": "Alpha", "location": where(Alpha)},
        {"registry": "vision_tower", "scope": "plug", "name": "Beta", "location": where(Beta)},
        {"registry": "vision_tower", "scope": "plug", "name": "B", "location": where(Beta)},
        {"registry": "vision_tower", "scope": "plug", "name": "Lazy", "location": "vlm_no_such_package_xyz.mod:Lazy"},
        {"registry": "activation", "scope": "vlm", "name": "gelu", "location": where(gelu)},
    ]
    assert "vlm_no_such_package_xyz.mod" not in sys.modules
    assert isinstance(describe(), list)  # the module roots by default


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, vlm.registry; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
