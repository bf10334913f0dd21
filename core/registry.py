"""Name -> component registries, after mmengine's ``Registry``.

For mmengine users the API is the familiar one::

    VISION_TOWERS = Registry("vision_tower")                    # a root, scope "vlm"
    MY_TOWERS = Registry("vision_tower", parent=VISION_TOWERS, scope="my_plugin")

    @MY_TOWERS.register_module()                                # or name="X" / name=["X", "Y"]
    class MyTower: ...

    MY_TOWERS.get("MyTower")               # own entries, then `locations`, then the parent chain
    VISION_TOWERS.get("my_plugin.MyTower") # "scope.name": the registry with that scope in the tree
    VISION_TOWERS.build({"type": "my_plugin.MyTower", "dim": 64}, dtype="bf16")

``locations`` are modules imported the first time a name is missing (never before), and
:attr:`Registry.on_missing_scope` is a hook that may load plugins when a scope is unknown.

Extension: ``register_module(name="X", module="package.module:attr")`` registers a *lazy* entry,
imported on the first ``get`` and cached. A torch-free plugin ``__init__`` can thus register
torch-using components by name; ``describe()``, ``in`` and ``repr`` never import them. When the
imported module registers that same object under that name itself, it is not a conflict.

This module imports no torch: ``vlmrun plugins --components`` lists the registries without it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar, overload

from vlm.errors import VlmError

_T = TypeVar("_T")
_LAZY_ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_MAX_LISTED = 10


class RegistryError(VlmError):
    """A name is unknown or taken, a registration is invalid, or a component failed to build."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _is_component(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(obj)


def location_of(entry: Any) -> str:
    """``"module:qualname"`` of a registered object; a lazy entry is its own location."""
    if isinstance(entry, str):
        return entry
    module = getattr(entry, "__module__", None) or "?"
    return f"{module}:{getattr(entry, '__qualname__', repr(entry))}"


def build_from_cfg(cfg: dict[str, Any], registry: Registry, **default_args: Any) -> Any:
    """The default build function: ``registry.get(cfg["type"])(**rest_of_cfg)``, defaults filled in."""
    args = {**default_args, **cfg}
    obj_type = args.pop("type")
    obj = registry.get(obj_type) if isinstance(obj_type, str) else obj_type
    return obj(**args)


class Registry:
    """A scoped name -> class/function table that can ``get`` and ``build`` its entries."""

    #: Called (no arguments) when a ``"scope.name"`` names no registry in the tree; the lookup is
    #: then retried once. The plugin manager sets it to load plugins, which create child registries.
    on_missing_scope: ClassVar[Callable[[], object] | None] = None

    def __init__(
        self,
        name: str,
        build_func: Callable[..., Any] | None = None,
        parent: Registry | None = None,
        scope: str | None = None,
        locations: Sequence[str] = (),
    ) -> None:
        if parent is None and scope is None:
            scope = "vlm"
        if scope is None:
            assert parent is not None
            raise RegistryError(
                f"{name} registry: a child of the {parent.name} registry needs scope=; pass the plugin's name"
            )
        self._name = name
        self._scope = scope
        self._parent = parent
        self._children: dict[str, Registry] = {}
        self._module_dict: dict[str, Any] = {}
        self._locations = tuple(locations)
        self._locations_imported = False
        self.build_func: Callable[..., Any] | None = (
            build_func if build_func is not None or parent is None else parent.build_func
        )
        if parent is not None:
            taken = parent.children.get(scope)
            if taken is not None and taken is not self:
                raise RegistryError(
                    f"{name} registry: scope {scope!r} is already a child of the {parent.name} registry; choose another scope"
                )
            parent._children[scope] = self

    # -- properties ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def scope(self) -> str:
        return self._scope

    @property
    def parent(self) -> Registry | None:
        return self._parent

    @property
    def children(self) -> dict[str, Registry]:
        return self._children

    @property
    def root(self) -> Registry:
        registry = self
        while registry._parent is not None:
            registry = registry._parent
        return registry

    @property
    def module_dict(self) -> dict[str, Any]:
        """Own entries; a lazy entry shows as its ``"pkg.mod:attr"`` string until resolved."""
        return self._module_dict

    def _label(self) -> str:
        return f"{self._name} registry (scope {self._scope!r})"

    def walk(self) -> Iterator[Registry]:
        """This registry, then its descendants, depth first."""
        yield self
        for child in self._children.values():
            yield from child.walk()

    def __len__(self) -> int:
        return len(self._module_dict)

    def __contains__(self, key: object) -> bool:
        """True when ``get(key)`` would find the name without importing anything new."""
        if not isinstance(key, str):
            return False
        scope, name = self._split(key)
        target = self if scope is None else self._find_scope(scope)
        while target is not None:
            if name in target._module_dict:
                return True
            target = target._parent
        return False

    def __repr__(self) -> str:
        lines = [f"Registry(name={self._name!r}, scope={self._scope!r}, {len(self)} entries)"]
        width = max((len(name) for name in self._module_dict), default=0)
        for name, entry in self._module_dict.items():
            lazy = " (lazy)" if isinstance(entry, str) else ""
            lines.append(f"  {name:<{width}}  {location_of(entry)}{lazy}")
        if self._children:
            lines.append(f"  children: {', '.join(self._children)}")
        return "\n".join(lines)

    # -- registration -------------------------------------------------------------------------

    @overload
    def register_module(
        self, name: str | Sequence[str] | None = None, force: bool = False, module: None = None
    ) -> Callable[[_T], _T]: ...

    @overload
    def register_module(self, name: str | Sequence[str] | None = None, force: bool = False, *, module: _T) -> _T: ...

    def register_module(self, name: str | Sequence[str] | None = None, force: bool = False, module: Any = None) -> Any:
        """Register ``module`` (a class, function or ``"pkg.mod:attr"``), or return a decorator that does."""
        if module is not None:
            self._register(module, name, force)
            return module

        def decorator(obj: _T) -> _T:
            self._register(obj, name, force)
            return obj

        return decorator

    def _register(self, module: Any, name: str | Sequence[str] | None, force: bool) -> None:
        if isinstance(module, str):
            if not _LAZY_ENTRY.match(module):
                raise RegistryError(f"{self._label()}: lazy entry {module!r} is not of the form 'package.module:attr'")
            if name is None:
                raise RegistryError(f"{self._label()}: lazy entry {module!r} needs name=")
        elif not _is_component(module):
            raise RegistryError(
                f"{self._label()}: can register a class, a function or a 'package.module:attr' string, "
                f"not {type(module).__name__} {module!r:.60}"
            )
        names = [module.__name__] if name is None else [name] if isinstance(name, str) else list(name)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise RegistryError(f"{self._label()}: name= must be a non-empty string or list of strings, got {name!r}")
        for key in names:
            taken = self._module_dict.get(key)
            lazy = isinstance(taken, str) or isinstance(module, str)
            if taken is None or force or taken is module or (lazy and location_of(taken) == location_of(module)):
                continue
            raise RegistryError(
                f"{self._label()}: {key!r} is already registered by {location_of(taken)}, "
                f"so {location_of(module)} cannot take it; choose another name or pass force=True"
            )
        for key in names:
            # the same location: an imported object replaces its lazy entry, never the reverse
            if force or key not in self._module_dict or not isinstance(module, str):
                self._module_dict[key] = module

    # -- lookup -------------------------------------------------------------------------------

    @staticmethod
    def _split(key: str) -> tuple[str | None, str]:
        scope, dot, name = key.partition(".")
        return (scope, name) if dot else (None, key)

    def _find_scope(self, scope: str) -> Registry | None:
        """The registry with ``scope``: this one or in its subtree, else anywhere under the root."""
        for tree in (self, self.root):
            for registry in tree.walk():
                if registry._scope == scope:
                    return registry
        return None

    def get(self, key: str) -> Any:
        """The class or function registered as ``key`` (``"name"`` or ``"scope.name"``)."""
        if not isinstance(key, str):
            raise RegistryError(f"{self._label()}: a key must be a string, got {type(key).__name__} {key!r:.60}")
        scope, name = self._split(key)
        target = self if scope is None else self._find_scope(scope)
        hook = type(self).on_missing_scope
        if target is None and scope is not None and hook is not None:
            hook()
            target = self._find_scope(scope)
        if target is None:
            scopes = ", ".join(registry._scope for registry in self.root.walk())
            raise RegistryError(
                f"{self._label()}: no registry has scope {scope!r} for {key!r} (scopes: {scopes}); "
                "install or load the plugin that defines it"
            )
        found = target._lookup(name)
        if found is None:
            raise RegistryError(target._unknown(name, key))
        return found

    def get_own(self, name: str) -> Any:
        """This registry's own entry ``name``, taken literally: no ``scope.`` split, no locations, no
        parent (for names with dots, such as the rewriter registries' ``"pkg.mod.func@backend"``).
        A lazy entry is imported now."""
        if name not in self._module_dict:
            raise RegistryError(self._unknown(name, name))
        return self._resolve(name)

    def _lookup(self, name: str) -> Any:
        """Own entries, then (once) the locations, then the parent chain; None when absent."""
        if name not in self._module_dict and not self._locations_imported:
            self._locations_imported = True
            for location in self._locations:
                try:
                    importlib.import_module(location)
                except Exception as exc:
                    raise RegistryError(
                        f"{self._label()}: could not import location {location!r} while looking up {name!r}: "
                        f"{_first_line(exc)}"
                    ) from exc
        if name in self._module_dict:
            return self._resolve(name)
        return self._parent._lookup(name) if self._parent is not None else None

    def _resolve(self, name: str) -> Any:
        entry = self._module_dict[name]
        if not isinstance(entry, str):
            return entry
        module_path, _, attr = entry.partition(":")
        try:
            obj: Any = importlib.import_module(module_path)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise RegistryError(
                f"{self._label()}: lazy entry {name!r} -> {entry!r} could not be imported: {_first_line(exc)}"
            ) from exc
        if not _is_component(obj):
            kind = type(obj).__name__
            raise RegistryError(
                f"{self._label()}: lazy entry {name!r} -> {entry!r} is a {kind}, not a class or function"
            )
        self._module_dict[name] = obj
        return obj

    def _unknown(self, name: str, key: str) -> str:
        known: list[str] = []
        registry: Registry | None = self
        while registry is not None:
            known += [n for n in registry._module_dict if n not in known]
            registry = registry._parent
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        listed = ", ".join(sorted(known)[:_MAX_LISTED]) or "none"
        more = f" (+{len(known) - _MAX_LISTED} more)" if len(known) > _MAX_LISTED else ""
        return f"{self._label()}: nothing is registered as {key!r}{hint} known: {listed}{more}"

    # -- building -----------------------------------------------------------------------------

    def build(self, cfg: dict[str, Any], **default_args: Any) -> Any:
        """Build ``cfg["type"]`` with the rest of ``cfg`` as arguments; ``default_args`` fill missing keys."""
        if not isinstance(cfg, dict):
            raise RegistryError(f"{self._label()}: build needs a dict with a 'type' key, got {type(cfg).__name__}")
        if "type" not in cfg and "type" not in default_args:
            raise RegistryError(f"{self._label()}: config {cfg!r:.80} has no 'type' key; add type='<registered name>'")
        cfg = dict(cfg)
        obj_type = cfg.get("type", default_args.get("type"))
        if not isinstance(obj_type, str) and not _is_component(obj_type):
            raise RegistryError(f"{self._label()}: type must be a name, class or function, not {obj_type!r:.60}")
        build_func = self.build_func if self.build_func is not None else build_from_cfg
        try:
            return build_func(cfg, registry=self, **default_args)
        except RegistryError:
            raise  # already one line and specific (an unknown name, a failed nested build)
        except Exception as exc:
            raise RegistryError(f"{self._name} could not build type={obj_type!r}: {_first_line(exc)}") from exc


VISION_TOWERS = Registry("vision_tower")
PROJECTORS = Registry("projector")
PATCH_EMBEDDINGS = Registry("patch_embedding")
ACTIVATIONS = Registry("activation")
CONFIG_BUILDERS = Registry("config_builder")
# vlm.rewrite's rewriters, one root per kind; each registering module gets a child scope named after
# it, and an entry is named "<target>@<backend>" (the rewriter's metadata lives in vlm.rewrite)
FUNCTION_REWRITERS = Registry("function_rewriter")
MODULE_REWRITERS = Registry("module_rewriter")
SYMBOLIC_REWRITERS = Registry("symbolic_rewriter")
ROOT_REGISTRIES: tuple[Registry, ...] = (
    VISION_TOWERS,
    PROJECTORS,
    PATCH_EMBEDDINGS,
    ACTIVATIONS,
    CONFIG_BUILDERS,
    FUNCTION_REWRITERS,
    MODULE_REWRITERS,
    SYMBOLIC_REWRITERS,
)

# What the core provides, by name. Lazy entries: the modules (which import torch) load on first use.
_CORE_COMPONENTS: dict[Registry, dict[str, str]] = {
    VISION_TOWERS: {
        "CLIPVisionTower": "vlm.nn.clip:CLIPVisionTower",
        "SiglipVisionTower": "vlm.nn.clip:CLIPVisionTower",  # one class: vision_config.model_type decides
    },
    PROJECTORS: {
        "MLPProjector": "vlm.nn.projectors:MLPProjector",
        "LayerNormMLPProjector": "vlm.nn.projectors:LayerNormMLPProjector",
        "GLUProjector": "vlm.nn.projectors:GLUProjector",
    },
    PATCH_EMBEDDINGS: {"ConvPatchEmbedding": "vlm.nn.patch_embedding:ConvPatchEmbedding"},
    ACTIVATIONS: {
        # transformers' hidden_act names (what configs say) ...
        "gelu": "vlm.nn.activation:gelu",
        "gelu_pytorch_tanh": "vlm.nn.activation:gelu_pytorch_tanh",
        "gelu_new": "vlm.nn.activation:NewGELU",
        "quick_gelu": "vlm.nn.activation:QuickGELU",
        "silu": "torch.nn:SiLU",
        "swish": "torch.nn:SiLU",
        "relu": "torch.nn:ReLU",
        # ... and the classes by their own names
        "GELU": "vlm.nn.activation:GELU",
        "NewGELU": "vlm.nn.activation:NewGELU",
        "QuickGELU": "vlm.nn.activation:QuickGELU",
        "SiluAndMul": "vlm.nn.activation:SiluAndMul",
        "GeluAndMul": "vlm.nn.activation:GeluAndMul",
    },
}
for _root, _entries in _CORE_COMPONENTS.items():
    for _name, _location in _entries.items():
        _root.register_module(name=_name, module=_location)
del _root, _entries, _name, _location


def describe(registries: Sequence[Registry] = ROOT_REGISTRIES) -> list[dict[str, str]]:
    """Every entry of ``registries`` and their descendants, without importing lazy entries or locations."""
    return [
        {"registry": registry.name, "scope": registry.scope, "name": name, "location": location_of(entry)}
        for root in registries
        for registry in root.walk()
        for name, entry in registry.module_dict.items()
    ]
