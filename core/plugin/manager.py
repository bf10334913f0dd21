"""Finding, loading and choosing model-family plugins.

Plugins come from ``entry_points(group="vlm.models")`` and from plain Python files
(``--plugin-file``, or ``VLM_PLUGIN_FILES`` separated by ``os.pathsep``). Each is loaded inside
its own try/except, so a broken plugin is reported and the others keep working. Loading is
idempotent and happens lazily in every process that builds a model: a worker process gets the
same plugins as its parent because plugin files travel in the environment.

Environment:

- ``VLM_LOAD_PLUGINS``: unset loads all plugins; empty loads none; ``a,b`` loads only those
  (entry-point or distribution names).
- ``VLM_TRACE_PLUGINS=1``: print every hook call and its result to stderr.

The build functions at the end are how the core (and a VLM plugin, for its language model)
turns a config into a model: ask every plugin's ``match``, pick one, call its hook.

This module must not import torch: ``vlmrun plugins`` lists plugins without it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from importlib_metadata import entry_points
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from vlm import hookspecs
from vlm.errors import PluginError, VlmError, reason
from vlm.registry import Registry

logger = logging.getLogger("vlm")

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from vlm.config import ModelConfig
    from vlm.grounding import GroundedBox
    from vlm.inputs import ModelInputs

    #: what :func:`grounding_parser` returns: ``parse(text, image_sizes, model_inputs) -> boxes``
    GroundingParser = Callable[[str, list[tuple[int, int]], ModelInputs], list[GroundedBox]]

ENTRY_POINT_GROUP = "vlm.models"
PLUGIN_FILES_ENV = "VLM_PLUGIN_FILES"
LOAD_PLUGINS_ENV = "VLM_LOAD_PLUGINS"
TRACE_PLUGINS_ENV = "VLM_TRACE_PLUGINS"


@dataclass
class PluginInfo:
    """What ``vlmrun plugins`` shows for one plugin, loaded or broken."""

    name: str
    source: str  # "entry point" or "file"
    location: str  # "module:object" of the entry point, or the file path
    distribution: str | None = None
    version: str | None = None
    api_version: str | None = None
    architectures: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Candidate:
    """One plugin's answer to ``match`` for a config."""

    plugin: str
    claim: hookspecs.Claim


class PluginRegistry:
    """One ``pluggy.PluginManager("vlm")`` plus what was learned while loading it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("vlm")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._loaded_entry_points = False
        self._loaded_files: set[str] = set()
        self._lock = threading.Lock()
        if os.environ.get(TRACE_PLUGINS_ENV, "") not in ("", "0"):
            self._enable_tracing()

    # -- loading -------------------------------------------------------------------------

    def load(self) -> PluginRegistry:
        """Load entry-point plugins and plugin files once; later calls only add new files."""
        with self._lock:
            if not self._loaded_entry_points:
                self._loaded_entry_points = True
                self._load_entry_points()
            for path in plugin_files_from_env():
                self._load_file(path)
        return self

    def _load_entry_points(self) -> None:
        wanted = _wanted_plugins()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if wanted is not None and ep.name not in wanted and dist not in wanted:
                continue
            info = PluginInfo(
                name=ep.name,
                source="entry point",
                location=ep.value,
                distribution=dist,
                version=ep.dist.version if ep.dist is not None else None,
            )
            if ep.name in self.infos:
                info.error = f"another plugin is already registered as {ep.name!r}"
                self.infos[f"{ep.name} ({dist})"] = info
                continue
            try:
                plugin = ep.load()
            except BaseException as exc:  # a plugin must never take the engine down
                if isinstance(exc, KeyboardInterrupt):
                    raise
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                self.infos[ep.name] = info
                continue
            self._register(plugin, info)

    def _load_file(self, path: str) -> None:
        resolved = str(Path(path).expanduser().resolve())
        if resolved in self._loaded_files:
            return
        self._loaded_files.add(resolved)
        name = Path(resolved).stem
        info = PluginInfo(name=name, source="file", location=resolved)
        if not Path(resolved).is_file():
            raise PluginError(f"plugin file {path!r} does not exist; pass the path of a .py file with hookimpls")
        module_name = f"vlm_plugin_file_{name}"
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            sys.modules.pop(module_name, None)
            # The user named this file explicitly: failing loudly beats silently ignoring it.
            raise PluginError(f"plugin file {path!r} failed to import: {type(exc).__name__}: {exc}") from exc
        self._register(module, info)
        if info.error:
            raise PluginError(f"plugin file {path!r}: {info.error}")

    def register_module(self, module: Any, name: str | None = None) -> PluginInfo:
        """Register an already imported plugin module or object (tests, notebooks); the same checks
        as for an entry point apply (API version, unknown hooks)."""
        name = name or getattr(module, "__name__", None) or repr(module)
        info = PluginInfo(name=name, source="module", location=name)
        self._register(module, info)
        return info

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        error = _api_version_error(plugin)
        if error is None:
            try:
                self.pm.register(plugin, name=info.name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                error = "rejected: " + " ".join(str(exc).split())  # pluggy's message spans lines
            else:
                error = self._unknown_hooks_error(plugin)
                if error:
                    self.pm.unregister(plugin)
        info.api_version = getattr(plugin, hookspecs.API_VERSION_ATTRIBUTE, None)
        if error:
            info.error = error
        else:
            info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or [])
        key = info.name
        if key in self.infos:  # a refused duplicate must not hide the plugin registered first
            key = f"{info.name} ({info.source}: {info.location})"
        self.infos[key] = info

    def _unknown_hooks_error(self, plugin: Any) -> str | None:
        """pluggy ignores a hookimpl with no spec; a misspelled hook must be an error instead."""
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
        if not unknown:
            return None
        known = ", ".join(
            sorted(n for n in dir(self.pm.hook) if not n.startswith("_") and getattr(self.pm.hook, n).has_spec())
        )
        return (
            f"hookimpl {', '.join(repr(n) for n in sorted(unknown))} matches no vlm hook "
            f"(misspelled?); the hooks are: {known}"
        )

    def _enable_tracing(self) -> None:
        def before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
            names = [impl.plugin_name for impl in hook_impls]
            print(f"[vlm plugins] {hook_name}({_short(kwargs)}) -> {names}", file=sys.stderr)

        def after(
            outcome: pluggy.Result[Any],
            hook_name: str,
            hook_impls: Sequence[pluggy.HookImpl],
            kwargs: Mapping[str, Any],
        ) -> None:
            try:
                result = outcome.get_result()
            except BaseException as exc:
                result = f"raised {type(exc).__name__}: {exc}"
            print(f"[vlm plugins] {hook_name} returned {_short(result)}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    # -- queries -------------------------------------------------------------------------

    def loaded(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.error is None]

    def broken(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.error is not None]

    def describe(self) -> list[PluginInfo]:
        """Every plugin with the architectures it serves (calls the ``architectures`` hook)."""
        for info in self.loaded():
            if "architectures" in info.hooks and not info.architectures:
                results = self._call_guarded(info, "architectures")
                info.architectures = [a for result in results for a in (result or [])]
        return sorted(self.infos.values(), key=lambda i: i.name)

    def _call_guarded(self, info: PluginInfo, hook: str, **kwargs: Any) -> list[Any]:
        """Call a hook of one plugin; a plugin that raises is marked broken instead of failing all."""
        try:
            return self.hook_of(info.name, hook)(**kwargs)
        except Exception as exc:
            info.error = f"{hook} hook raised {type(exc).__name__}: {reason(exc)}"
            logger.warning("plugin %r is skipped: its %s", info.name, info.error)
            return []

    def candidates(self, hf_config: Any) -> list[Candidate]:
        """Every plugin that claims ``hf_config``, highest priority first."""
        found = []
        for info in self.loaded():
            if "match" not in info.hooks:
                continue
            for claim in self._call_guarded(info, "match", hf_config=hf_config):
                if claim is True:
                    claim = hookspecs.Claim()
                if isinstance(claim, hookspecs.Claim):
                    found.append(Candidate(info.name, claim))
        return sorted(found, key=lambda c: -c.claim.priority)

    def choose(self, hf_config: Any, forced: str | None = None) -> tuple[str, list[Candidate]]:
        """The plugin that serves ``hf_config``, and every claim that was made.

        :param forced: a plugin name from ``--plugin``; used even if it does not claim the config.
        """
        claims = self.candidates(hf_config)
        if forced:
            if forced not in {info.name for info in self.loaded()}:
                raise PluginError(
                    f"--plugin {forced!r} is not loaded; loaded plugins: {_names(self.loaded())}{self._broken_hint()}"
                )
            return forced, claims
        if not claims:
            archs = getattr(hf_config, "architectures", None)
            model_type = getattr(hf_config, "model_type", None)
            raise PluginError(
                f"no plugin serves architectures={archs} model_type={model_type!r}; "
                f"loaded plugins: {_names(self.loaded())}{self._broken_hint()}; install a plugin "
                "for this family (pip install vlm-plugin-<family>) or pass --plugin-file my_model.py"
            )
        top = [c for c in claims if c.claim.priority == claims[0].claim.priority]
        if len(top) > 1:
            names = " and ".join(repr(c.plugin) for c in top)
            flags = " or ".join(f"--plugin {c.plugin}" for c in top)
            raise PluginError(
                f"plugins {names} both claim this model at priority {top[0].claim.priority}; choose one with {flags}"
            )
        return top[0].plugin, claims

    def call(self, plugin: str, hook: str, **kwargs: Any) -> Any:
        """Call a first-result hook on one plugin (keyword arguments, so impls may take fewer).

        A plugin's own :class:`VlmError` passes through; any other exception becomes one line
        naming the plugin and the hook (the traceback stays on the exception's cause)."""
        try:
            result = self.hook_of(plugin, hook)(**kwargs)
        except VlmError:
            raise
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            raise PluginError(
                f"plugin {plugin!r} failed in its {hook} hook ({why}); report it to the plugin's authors, or "
                "choose another plugin with --plugin"
            ) from exc
        if result is None:
            raise PluginError(f"plugin {plugin!r} returned nothing from the {hook!r} hook")
        return result

    def hook_of(self, plugin: str, hook: str) -> Any:
        """The caller of ``hook`` on ``plugin`` alone (keyword arguments, so impls may take fewer)."""
        others = [p for name, p in self.pm.list_name_plugin() if name != plugin]
        return self.pm.subset_hook_caller(hook, remove_plugins=others)

    def _broken_hint(self) -> str:
        broken = self.broken()
        if not broken:
            return ""
        return " (failed to load: " + "; ".join(f"{i.name}: {i.error}" for i in broken) + ")"


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use (in workers too)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
    return _registry.load()


# a component registry asked for "scope.Name" of a scope nobody created yet loads the plugins,
# which create their child scopes
Registry.on_missing_scope = get_registry


def reset_registry() -> None:
    """Forget every loaded plugin (tests; after changing ``VLM_LOAD_PLUGINS``)."""
    global _registry
    with _registry_lock:
        _registry = None


def add_plugin_file(path: str) -> None:
    """Register a plugin file for this process and every process started from it."""
    resolved = str(Path(path).expanduser().resolve())
    if not Path(resolved).is_file():  # check first: a bad path must not stay in the environment
        raise PluginError(f"plugin file {path!r} does not exist; pass the path of a .py file with hookimpls")
    files = plugin_files_from_env()
    if resolved not in files:
        os.environ[PLUGIN_FILES_ENV] = os.pathsep.join([*files, resolved])


def plugin_files_from_env() -> list[str]:
    return [p for p in os.environ.get(PLUGIN_FILES_ENV, "").split(os.pathsep) if p]


def _wanted_plugins() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _api_version_error(plugin: Any) -> str | None:
    declared = getattr(plugin, hookspecs.API_VERSION_ATTRIBUTE, None)
    if declared is None:
        return None  # undeclared: assume the current contract
    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier:
        return f"{hookspecs.API_VERSION_ATTRIBUTE}={declared!r} is not a version range like '>=1.0,<2'"
    if Version(hookspecs.API_VERSION) in spec:
        return None
    major = Version(hookspecs.API_VERSION).major
    return (
        f"written for vlm plugin API {declared}, but this vlm-core provides API "
        f"{hookspecs.API_VERSION} (supported: >={major}.0,<{major + 1}); upgrade the plugin or "
        "install a vlm-core it supports"
    )


def _names(infos: list[PluginInfo]) -> str:
    return ", ".join(sorted(i.name for i in infos)) or "none"


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- building


def choose_plugin(hf_config: Any, forced: str | None = None) -> str:
    plugin, _ = get_registry().choose(hf_config, forced)
    return plugin


def build_model(
    model_config: ModelConfig, dtype: torch.dtype, device: torch.device, plugin: str | None = None
) -> tuple[torch.nn.Module, str]:
    """Build (not load) the model of ``model_config`` with the plugin that claims it."""
    registry = get_registry()
    name = choose_plugin(model_config.hf_config, plugin)
    model = registry.call(
        name, "build_model", hf_config=model_config.hf_config, model_config=model_config, dtype=dtype, device=device
    )
    return model, name


def check_model(model: Any, plugin: str) -> None:
    """What build_model returned must be a module with ``load_weights`` (the contract), or a one-line error."""
    import torch

    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "load_weights", None)):
        raise PluginError(
            f"plugin {plugin!r} returned {type(model).__name__} from build_model, not a torch.nn.Module with "
            "load_weights(weights); report it to the plugin's authors, or choose another plugin with --plugin"
        )


def build_language_model(
    text_config: Any, model_config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """The language model for a VLM's nested text config, from whichever plugin claims it."""
    registry = get_registry()
    name = choose_plugin(text_config)
    model = registry.call(
        name, "build_model", hf_config=text_config, model_config=model_config, dtype=dtype, device=device
    )
    check_model(model, name)
    return model


def build_preprocessor(model_config: ModelConfig, tokenizer: Any, plugin: str) -> Any:
    return get_registry().call(
        plugin,
        "build_preprocessor",
        hf_config=model_config.hf_config,
        model_config=model_config,
        model_path=model_config.path,
        tokenizer=tokenizer,
    )


def grounding_parser(plugin: str, hf_config: Any) -> GroundingParser | None:
    """The chosen ``plugin``'s ``parse_grounding`` hook for the model of ``hf_config``, as
    ``parse(text, image_sizes, model_inputs) -> list[GroundedBox]``; ``None`` when the plugin has
    no such hook (its family writes no boxes). Only that plugin is asked.

    The parser raises a one-line :class:`PluginError` naming the plugin when the hook fails or
    returns something other than a list of ``GroundedBox``."""
    from vlm.grounding import GroundedBox

    registry = get_registry()
    module = registry.pm.get_plugin(plugin)
    if module is None or "parse_grounding" not in {c.name for c in registry.pm.get_hookcallers(module) or []}:
        return None
    hook = registry.hook_of(plugin, "parse_grounding")

    def parse(text: str, image_sizes: list[tuple[int, int]], model_inputs: ModelInputs) -> list[GroundedBox]:
        try:
            boxes = hook(text=text, image_sizes=image_sizes, hf_config=hf_config, model_inputs=model_inputs)
        except VlmError:
            raise
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            raise PluginError(
                f"plugin {plugin!r} failed in its parse_grounding hook ({why}); report it to the plugin's authors"
            ) from exc
        if boxes is None:
            return []
        if not isinstance(boxes, list) or not all(isinstance(box, GroundedBox) for box in boxes):
            raise PluginError(
                f"plugin {plugin!r} returned {_short(boxes, 80)} from parse_grounding, not a list of "
                "vlm.plugin.GroundedBox; report it to the plugin's authors"
            )
        return boxes

    return parse
