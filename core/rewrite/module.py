"""Module rewriters: replace every instance of a module class in a model by a wrapper.

::

    @MODULE_REWRITER.register_rewrite_module("transformers.models.siglip.modeling_siglip.SiglipAttention")
    class PagedSiglipAttention(torch.nn.Module):
        def __init__(self, module, cfg, **kwargs):  # kwargs: backend=, the registration's extras, patch_model's
            super().__init__()
            self.module = module

    model = patch_model(model, cfg, backend="cpu")

A module matches when its class *is* the target class (a subclass is another class, with its own
forward). Children are patched before their parent, and a wrapper's own children are not visited
again. The replacement is permanent for that model (no context is needed); the engine patches
each model it loads, after its weights are in and before they are packed for inference.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from vlm.errors import reason
from vlm.registry import MODULE_REWRITERS
from vlm.rewrite.records import (
    DEFAULT_BACKEND,
    RewriterError,
    RewriterRecord,
    RewriterTable,
    check_backend,
    decorator_or_register,
)
from vlm.rewrite.targets import find_slot

if TYPE_CHECKING:
    import torch


class ModuleRewriter:
    """``MODULE_REWRITER``: the module rewriters of every backend."""

    def __init__(self) -> None:
        self.table = RewriterTable("module", MODULE_REWRITERS, "a dotted class name like 'pkg.module.Class'")

    def register_rewrite_module(
        self,
        module_type: str,
        backend: str = DEFAULT_BACKEND,
        *,
        priority: int = 0,
        owner: str | None = None,
        location: str | None = None,
        **extra: Any,
    ) -> Any:
        """Replace instances of the class ``module_type`` (dotted name) on ``backend``: a class
        decorator, or with ``location="pkg.mod:Wrapper"`` a lazy registration. ``priority`` and
        ``owner`` as for function rewriters; ``extra`` is passed to the wrapper's ``__init__``."""
        owner = owner or sys._getframe(1).f_globals.get("__name__", "?")
        return decorator_or_register(
            lambda wrapper: self.table.add(module_type, backend, wrapper, owner, priority, extra), location
        )

    def remove(self, module_type: str, backend: str = DEFAULT_BACKEND, owner: str | None = None) -> None:
        self.table.remove(module_type, backend, owner)

    def records(self) -> list[RewriterRecord]:
        return self.table.records()

    def patch_model(
        self,
        model: torch.nn.Module,
        cfg: Any = None,
        backend: str = DEFAULT_BACKEND,
        recursive: bool = True,
        **kwargs: Any,
    ) -> torch.nn.Module:
        """``model`` with every instance of a rewritten class replaced by ``Wrapper(module, cfg,
        backend=backend, **extra, **kwargs)``; the model itself may be replaced, so use the result."""
        check_backend(backend, "patch_model")
        if not self.table:
            return model
        wrappers: dict[type, RewriterRecord] = {}
        for target, record in self.table.choose(backend).items():
            slot = find_slot(record)
            if slot is None:
                continue
            cls = slot.read()[1]
            if not isinstance(cls, type):
                raise RewriterError(f"module rewriter {record.label()} targets {target!r}, which is not a class")
            wrappers[cls] = record
        if not wrappers:
            return model
        return _patch(model, wrappers, cfg, backend, recursive, kwargs)


def _patch(
    module: torch.nn.Module,
    wrappers: dict[type, RewriterRecord],
    cfg: Any,
    backend: str,
    recursive: bool,
    kwargs: dict[str, Any],
) -> torch.nn.Module:
    import torch

    if recursive:
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = _patch(child, wrappers, cfg, backend, recursive, kwargs)
    record = wrappers.get(type(module))
    if record is None:
        return module
    wrapper = record.load()
    try:
        replaced = wrapper(module, cfg, backend=backend, **{**record.extra, **kwargs})
    except Exception as exc:
        raise RewriterError(
            f"module rewriter {record.label()} failed to wrap a {record.target} ({type(exc).__name__}: {reason(exc)})"
        ) from exc
    if not isinstance(replaced, torch.nn.Module):
        raise RewriterError(
            f"module rewriter {record.label()} made a {type(replaced).__name__} of a {record.target}, not a "
            "torch.nn.Module; the wrapper must be a torch.nn.Module class"
        )
    return replaced


MODULE_REWRITER = ModuleRewriter()


def patch_model(
    model: torch.nn.Module, cfg: Any = None, backend: str = DEFAULT_BACKEND, recursive: bool = True, **kwargs: Any
) -> torch.nn.Module:
    """Replace every instance of a rewritten module class in ``model`` (see :class:`ModuleRewriter`)."""
    return MODULE_REWRITER.patch_model(model, cfg, backend, recursive, **kwargs)
