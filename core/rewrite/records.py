"""What the three kinds of rewriter share: one record per registration, kept in a registry, and the
rule that picks one rewriter per target for a backend.

A rewriter is registered for a *target* (a dotted name) and a *backend* (``default``, ``cpu``,
``cuda``, ``onnx``, ...). For a backend, a target's rewriter is the one registered for that
backend, else the one registered for ``default``; among several for the same backend the highest
``priority`` wins, and two at the same highest priority are an error naming both.

Each registering module (the *owner*, found from the caller's frame unless ``owner=`` is given)
gets a child scope of the kind's root registry in :mod:`vlm.registry`, holding its rewriters as
``"<target>@<backend>"`` entries; ``vlmrun plugins --components`` lists them with the other
registries. Imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm.registry import Registry, RegistryError, location_of

DEFAULT_BACKEND = "default"
_BACKEND = re.compile(r"^[a-z][a-z0-9_]*$")
DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_LAZY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class RewriterError(RegistryError):
    """A rewriter is invalid, conflicts with another, or its target cannot be found."""


def check_backend(backend: object, what: str) -> str:
    if not isinstance(backend, str) or not _BACKEND.match(backend):
        raise RewriterError(
            f"{what}: backend={backend!r} is not a backend name; use 'default', 'cpu', 'cuda', 'onnx' "
            "or another lower-case name"
        )
    return backend


@dataclass(frozen=True)
class RewriterRecord:
    """One registration: what it rewrites, for which backend, who registered it, and where it lives."""

    kind: str  # "function", "module" or "symbolic"
    target: str
    backend: str
    owner: str  # the module that registered it
    priority: int
    location: str  # "module:qualname" of the rewriter (a lazy entry: as registered)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    registry: Registry | None = field(default=None, compare=False, repr=False)

    @property
    def entry_name(self) -> str:
        return f"{self.target}@{self.backend}"

    def label(self) -> str:
        return f"{self.location} (registered by {self.owner})"

    def load(self) -> Any:
        """The rewriter itself (a lazy entry is imported now)."""
        assert self.registry is not None
        try:
            return self.registry.get_own(self.entry_name)
        except RegistryError as exc:
            raise RewriterError(f"{self.kind} rewriter for {self.target!r}: {exc}") from exc

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "backend": self.backend,
            "owner": self.owner,
            "priority": self.priority,
            "location": self.location,
        }


class RewriterTable:
    """The records of one kind of rewriter, stored in ``root`` (one child registry per owner)."""

    def __init__(self, kind: str, root: Registry, target_hint: str, target_pattern: re.Pattern[str] = DOTTED) -> None:
        self.kind = kind
        self.root = root
        self._target_hint = target_hint  # what a valid target looks like, for the error message
        self._target_pattern = target_pattern
        self._records: dict[tuple[str, str, str], RewriterRecord] = {}
        #: bumped by every change, so caches of what was chosen know when to recompute
        self.generation = 0

    # -- registration -------------------------------------------------------------------------

    def add(
        self,
        target: object,
        backend: object,
        rewriter: Any,
        owner: str,
        priority: object,
        extra: Mapping[str, Any],
    ) -> RewriterRecord:
        what = f"{self.kind} rewriter"
        if not isinstance(target, str) or not self._target_pattern.match(target):
            raise RewriterError(f"{what}: target {target!r} is not {self._target_hint}")
        what = f"{self.kind} rewriter for {target!r}"
        backend = check_backend(backend, what)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RewriterError(f"{what}: priority={priority!r} must be an integer (higher wins)")
        if isinstance(rewriter, str) and not _LAZY.match(rewriter):
            raise RewriterError(f"{what}: location {rewriter!r} is not of the form 'package.module:attr'")
        record = RewriterRecord(
            kind=self.kind,
            target=target,
            backend=backend,
            owner=owner,
            priority=priority,
            location=location_of(rewriter),
            extra=dict(extra),
            registry=self._scope_of(owner),
        )
        key = (target, backend, owner)
        taken = self._records.get(key)
        if taken is not None and taken.location != record.location:
            raise RewriterError(
                f"{owner} registers two {self.kind} rewriters for {target!r} (backend {backend!r}): "
                f"{taken.location} and {record.location}; keep one"
            )
        assert record.registry is not None
        # the same location again (a module imported twice, a plugin file reloaded): the new object wins
        record.registry.register_module(name=record.entry_name, module=rewriter, force=True)
        self._records[key] = record
        self.generation += 1
        return record

    def _scope_of(self, owner: str) -> Registry:
        child = self.root.children.get(owner)
        return child if child is not None else Registry(self.root.name, parent=self.root, scope=owner)

    def remove(self, target: str, backend: str = DEFAULT_BACKEND, owner: str | None = None) -> None:
        """Forget the rewriter(s) of ``target`` for ``backend`` (only ``owner``'s, when given)."""
        keys = [k for k in self._records if k[0] == target and k[1] == backend and owner in (None, k[2])]
        if not keys:
            who = f" registered by {owner}" if owner else ""
            raise RewriterError(f"no {self.kind} rewriter for {target!r} (backend {backend!r}){who} to remove")
        for key in keys:
            record = self._records.pop(key)
            assert record.registry is not None
            record.registry.module_dict.pop(record.entry_name, None)
        self.generation += 1

    # -- queries ------------------------------------------------------------------------------

    def records(self) -> list[RewriterRecord]:
        return sorted(self._records.values(), key=lambda r: (r.target, r.backend, r.owner))

    def __bool__(self) -> bool:
        return bool(self._records)

    def choose(self, backend: str) -> dict[str, RewriterRecord]:
        """For each target, the rewriter that applies on ``backend`` (its own before ``default``)."""
        check_backend(backend, f"{self.kind} rewriters")
        by_target: dict[str, dict[str, list[RewriterRecord]]] = {}
        for record in self._records.values():
            if record.backend in (backend, DEFAULT_BACKEND):
                by_target.setdefault(record.target, {}).setdefault(record.backend, []).append(record)
        chosen = {}
        for target, by_backend in by_target.items():
            candidates = by_backend.get(backend) or by_backend[DEFAULT_BACKEND]
            chosen[target] = self._highest(candidates)
        return chosen

    def _highest(self, candidates: list[RewriterRecord]) -> RewriterRecord:
        ranked = sorted(candidates, key=lambda r: (-r.priority, r.owner))
        if len(ranked) > 1 and ranked[0].priority == ranked[1].priority:
            first, second = ranked[0], ranked[1]
            raise RewriterError(
                f"{self.kind} rewriters {first.label()} and {second.label()} both rewrite {first.target!r} "
                f"for backend {first.backend!r} at priority {first.priority}; register one of them with a "
                "higher priority= (or leave one plugin out with VLM_LOAD_PLUGINS)"
            )
        return ranked[0]


def decorator_or_register(
    register: Callable[[Any], RewriterRecord], location: str | None
) -> Callable[[Any], Any] | str:
    """``location=`` registers a lazy entry now and returns it; otherwise a decorator that registers
    the decorated object and returns it unchanged."""
    if location is not None:
        register(location)
        return location

    def decorator(obj: Any) -> Any:
        register(obj)
        return obj

    return decorator
