"""Finding what a dotted name points at, and the attribute slots a patch writes to and restores.

``"vlm.kernels.rms_norm"`` is attribute ``rms_norm`` of module ``vlm.kernels``;
``"pkg.mod.Class.method"`` is attribute ``method`` of a class; ``"torch.Tensor.repeat"`` likewise
(inherited from ``torch._C.TensorBase``: patching sets it on ``torch.Tensor``, restoring deletes it
again). The longest importable module prefix is imported, the rest is walked with ``getattr``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types
from dataclasses import dataclass
from typing import Any

from vlm.errors import reason
from vlm.rewrite.records import RewriterError, RewriterRecord

logger = logging.getLogger("vlm")

#: set on every installed wrapper: the raw object (function, staticmethod, ...) it replaced first
ORIGIN_ATTR = "__vlm_rewrite_origin__"


@dataclass(frozen=True)
class Slot:
    """One attribute of a module or class that a patch overwrites."""

    namespace: Any  # a module or a class
    attr: str

    def read(self) -> tuple[bool, Any]:
        """``(own, raw)``: whether the namespace holds the attribute itself (not inherited, not a
        module ``__getattr__``), and the raw value (a staticmethod stays a staticmethod)."""
        own = vars(self.namespace)
        if self.attr in own:
            return True, own[self.attr]
        if isinstance(self.namespace, type):
            return False, inspect.getattr_static(self.namespace, self.attr)
        return False, getattr(self.namespace, self.attr)

    def write(self, raw: Any) -> None:
        setattr(self.namespace, self.attr, raw)

    def restore(self, own: bool, raw: Any) -> None:
        if own:
            setattr(self.namespace, self.attr, raw)
        elif self.attr in vars(self.namespace):
            delattr(self.namespace, self.attr)

    @property
    def is_module_level(self) -> bool:
        return isinstance(self.namespace, types.ModuleType)


def find_slot(record: RewriterRecord) -> Slot | None:
    """The slot ``record.target`` names, importing what it needs; ``None`` when the target's
    top-level package is not installed (nothing can call it then)."""
    parts = record.target.split(".")
    module = None
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        try:
            module = importlib.import_module(name)
            break
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing == parts[0]:
                logger.debug("%s rewriter for %r skipped: %s is not installed", record.kind, record.target, missing)
                return None
            if not (name == missing or name.startswith(missing + ".")):
                raise _error(record, f"importing {name} failed ({reason(exc)})") from exc
        except Exception as exc:
            raise _error(record, f"importing {name} failed ({type(exc).__name__}: {reason(exc)})") from exc
    assert module is not None  # parts[0] either imports or is reported missing above
    namespace: Any = module
    for part in parts[end:-1]:
        try:
            namespace = getattr(namespace, part)
        except AttributeError:
            raise _error(record, f"{_name_of(namespace)} has no attribute {part!r}") from None
    slot = Slot(namespace, parts[-1])
    try:
        slot.read()
    except AttributeError:
        raise _error(record, f"{_name_of(namespace)} has no attribute {parts[-1]!r}") from None
    return slot


def _name_of(namespace: Any) -> str:
    kind = "module" if isinstance(namespace, types.ModuleType) else "class" if isinstance(namespace, type) else "object"
    return f"{kind} {getattr(namespace, '__name__', repr(namespace))!r}"


def _error(record: RewriterRecord, why: str) -> RewriterError:
    return RewriterError(
        f"{record.kind} rewriter {record.label()} targets {record.target!r}, which cannot be found: {why}; "
        "fix the dotted name it is registered for"
    )


def pristine(raw: Any) -> Any:
    """The raw object a slot held before any rewriter was installed over it."""
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    original = getattr(func, ORIGIN_ATTR, None) if isinstance(func, types.FunctionType) else None
    return raw if original is None else original


def callable_of(raw: Any) -> Any:
    """What a rewriter calls as ``origin_func``: the function inside a staticmethod / classmethod
    (a classmethod's takes ``cls`` first), else the raw object itself."""
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def find_aliases(targets: dict[int, Any]) -> dict[int, list[Slot]]:
    """For each pristine object in ``targets`` (by id), every module attribute that holds it (or a
    wrapper installed over it): ``from vlm.kernels import rms_norm`` made such an alias."""
    found: dict[int, list[Slot]] = {key: [] for key in targets}
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        for attr, value in list(vars(module).items()):
            key = id(value)
            # type(), not isinstance(): no __class__ lookup, which some deprecation shims warn about
            if key not in targets and type(value) is types.FunctionType:
                key = id(getattr(value, ORIGIN_ATTR, None))
            if key in targets:
                found[key].append(Slot(module, attr))
    return found
