"""Function rewriters: replace a function, a method or a torch function while a context is active.

::

    @FUNCTION_REWRITER.register_rewriter(func_name="vlm.kernels.rms_norm", backend="cuda")
    def rms_norm_with_my_kernel(x, weight, eps):
        ctx = FUNCTION_REWRITER.get_context()  # ctx.origin_func, ctx.cfg, ctx.backend
        ...

How a rewrite is installed (by :class:`vlm.rewrite.RewriterContext`): the target's attribute is
set to a wrapper that calls the rewriter with ``get_context()`` pointing at it. For a function of a
module, every other module attribute holding the same function object is patched too (what
``from vlm.kernels import rms_norm`` made), as mmdeploy does; a method is patched on its class
only. A wrapper rewrites only in the thread that entered the context and only while the context is
active: a copy of it that escaped (a module imported inside the context, an attribute stored by
model code) calls the original afterwards, and other threads always get the original.

What is installed for a backend (the *plan*) is computed on the first context for it and cached
until a rewriter is registered or removed, or (for module functions, whose aliases are searched
in every module) until a module is imported: entering a context costs a dictionary lookup when
nothing is registered, and a few microseconds per patched attribute otherwise.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any

from vlm.registry import FUNCTION_REWRITERS
from vlm.rewrite.records import (
    DEFAULT_BACKEND,
    RewriterError,
    RewriterRecord,
    RewriterTable,
    decorator_or_register,
)
from vlm.rewrite.targets import ORIGIN_ATTR, Slot, callable_of, find_aliases, find_slot, pristine


@dataclass(frozen=True)
class FunctionRewriteContext:
    """What ``FUNCTION_REWRITER.get_context()`` returns inside a rewriter."""

    origin_func: Callable[..., Any]  # the original; a method's takes self (a classmethod's cls) first
    cfg: Any  # the cfg the RewriterContext was entered with (the engine's EngineConfig)
    backend: str  # the context's backend ("cpu", "cuda", "onnx", ...), also for a "default" rewriter
    target: str  # the dotted name the rewriter is registered for
    extra: Mapping[str, Any] = field(default_factory=dict)  # register_rewriter's extra keyword arguments


@dataclass(frozen=True)
class PlannedRewrite:
    record: RewriterRecord
    rewriter: Callable[..., Any]
    slots: tuple[Slot, ...]  # the target first, then its aliases in other modules


@dataclass(frozen=True)
class _Plan:
    generation: int
    modules: int | None  # len(sys.modules) when aliases were searched; None: no module function
    rewrites: tuple[PlannedRewrite, ...]


class _Liveness:
    __slots__ = ("live", "thread")

    def __init__(self) -> None:
        self.live = True
        self.thread = get_ident()


@dataclass
class Installed:
    """The patches one context entry made, and how to undo them."""

    liveness: _Liveness
    modules: int  # len(sys.modules) at install: more at uninstall means a module may hold a wrapper
    undo: list[tuple[Slot, bool, Any]] = field(default_factory=list)  # (slot, own, raw before)
    wrappers: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id -> (wrapper, what it replaced)


_calls = threading.local()


def _call_stack() -> list[FunctionRewriteContext]:
    stack = getattr(_calls, "stack", None)
    if stack is None:
        stack = _calls.stack = []
    return stack


class FunctionRewriter:
    """``FUNCTION_REWRITER``: the function rewriters of every backend."""

    def __init__(self) -> None:
        self.table = RewriterTable(
            "function",
            FUNCTION_REWRITERS,
            "a dotted name like 'pkg.module.function', 'pkg.module.Class.method' or 'torch.Tensor.repeat'",
        )
        self._plans: dict[str, _Plan] = {}

    def register_rewriter(
        self,
        func_name: str,
        backend: str = DEFAULT_BACKEND,
        *,
        priority: int = 0,
        owner: str | None = None,
        location: str | None = None,
        **extra: Any,
    ) -> Any:
        """Rewrite ``func_name`` on ``backend``: a decorator, or with ``location="pkg.mod:func"`` a
        lazy registration (imported when a context first needs it; keeps a plugin's ``__init__``
        free of torch).

        :param priority: among rewriters of one target and backend the highest wins; two at the
            same highest priority (from two owners) are an error naming both.
        :param owner: who registers it (default: the calling module).
        :param extra: kept on the record; the rewriter sees them as ``get_context().extra``.
        """
        owner = owner or sys._getframe(1).f_globals.get("__name__", "?")
        return decorator_or_register(
            lambda rewriter: self.table.add(func_name, backend, rewriter, owner, priority, extra), location
        )

    def remove(self, func_name: str, backend: str = DEFAULT_BACKEND, owner: str | None = None) -> None:
        """Forget the rewriter(s) of ``func_name`` for ``backend`` (only ``owner``'s, when given)."""
        self.table.remove(func_name, backend, owner)

    def records(self) -> list[RewriterRecord]:
        return self.table.records()

    def get_context(self) -> FunctionRewriteContext:
        """The context of the rewriter running now, in this thread (the innermost one)."""
        stack = _call_stack()
        if not stack:
            raise RewriterError(
                "FUNCTION_REWRITER.get_context() was called outside a function rewriter; call it in the "
                "body of a function registered with FUNCTION_REWRITER.register_rewriter, while it runs"
            )
        return stack[-1]

    # -- installing -------------------------------------------------------------------------

    def plan(self, backend: str) -> tuple[PlannedRewrite, ...]:
        """What a context for ``backend`` installs (cached; imports the targets the first time)."""
        if not self.table:
            return ()
        cached = self._plans.get(backend)
        if (
            cached is not None
            and cached.generation == self.table.generation
            and (cached.modules is None or cached.modules == len(sys.modules))
        ):
            return cached.rewrites
        generation = self.table.generation
        rewrites = self._build_plan(backend)
        has_module_functions = any(slot.is_module_level for rewrite in rewrites for slot in rewrite.slots)
        self._plans[backend] = _Plan(generation, len(sys.modules) if has_module_functions else None, rewrites)
        return rewrites

    def _build_plan(self, backend: str) -> tuple[PlannedRewrite, ...]:
        found: list[tuple[RewriterRecord, Callable[..., Any], Slot, Any]] = []
        for target, record in sorted(self.table.choose(backend).items()):
            slot = find_slot(record)
            if slot is None:
                continue
            rewriter = record.load()
            if not callable(rewriter):
                raise RewriterError(
                    f"function rewriter {record.label()} is a {type(rewriter).__name__}, not a function"
                )
            original = pristine(slot.read()[1])
            if not callable(callable_of(original)):
                raise RewriterError(
                    f"function rewriter {record.label()} targets {target!r}, which is a "
                    f"{type(original).__name__}, not a function or method; register it for a function"
                )
            found.append((record, rewriter, slot, original))
        module_level = {id(original): original for _, _, slot, original in found if slot.is_module_level}
        aliases = find_aliases(module_level) if module_level else {}
        rewrites = []
        for record, rewriter, slot, original in found:
            slots = [slot]
            seen = {(id(slot.namespace), slot.attr)}
            for alias in aliases.get(id(original), []) if slot.is_module_level else []:
                if (id(alias.namespace), alias.attr) not in seen:
                    seen.add((id(alias.namespace), alias.attr))
                    slots.append(alias)
            rewrites.append(PlannedRewrite(record, rewriter, tuple(slots)))
        return tuple(rewrites)


def install(plan: tuple[PlannedRewrite, ...], cfg: Any, backend: str) -> Installed:
    """Write a wrapper into every slot of ``plan``; undone by :func:`uninstall` (also on failure)."""
    installed = Installed(_Liveness(), len(sys.modules))
    try:
        for planned in plan:
            for slot in planned.slots:
                own, raw = slot.read()
                original = pristine(raw)  # nested contexts: the inner one wraps the original, not the outer's wrapper
                call = FunctionRewriteContext(
                    callable_of(original), cfg, backend, planned.record.target, planned.record.extra
                )
                wrapper = _wrap(planned.rewriter, call, installed.liveness)
                setattr(wrapper, ORIGIN_ATTR, original)
                slot.write(type(original)(wrapper) if isinstance(original, (staticmethod, classmethod)) else wrapper)
                installed.undo.append((slot, own, raw))
                installed.wrappers[id(wrapper)] = (wrapper, callable_of(raw))
    except BaseException:
        uninstall(installed)
        raise
    return installed


def uninstall(installed: Installed) -> None:
    """Put back what :func:`install` replaced; wrappers that escaped call the original from now on."""
    installed.liveness.live = False
    for slot, own, raw in reversed(installed.undo):
        slot.restore(own, raw)
    if installed.wrappers and len(sys.modules) != installed.modules:
        # a module imported inside the context may have copied a wrapper (`from pkg import func`)
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                hit = installed.wrappers.get(id(value))
                if hit is not None and hit[0] is value:
                    namespace[attr] = hit[1]


def _wrap(rewriter: Callable[..., Any], call: FunctionRewriteContext, liveness: _Liveness) -> Callable[..., Any]:
    origin = call.origin_func

    def rewritten(*args: Any, **kwargs: Any) -> Any:
        if not liveness.live or get_ident() != liveness.thread:
            return origin(*args, **kwargs)
        stack = _call_stack()
        stack.append(call)
        try:
            return rewriter(*args, **kwargs)
        finally:
            stack.pop()

    try:
        functools.update_wrapper(rewritten, origin)
    except (AttributeError, TypeError):  # some builtins lack a name or a writable dict
        pass
    return rewritten


FUNCTION_REWRITER = FunctionRewriter()
