"""Symbolic rewriters: ONNX translations for what torch's exporter cannot translate by itself.

``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter) translates each
node of the exported graph with onnxscript's torchlib, and takes extra translations in
``custom_translation_table``: ``{torch op overload: function}``, the function building the ONNX
graph with onnxscript ops (a plain Python function calling ``onnxscript.opset18`` ops; the
exporter traces it). This module collects such translations from plugins::

    @SYMBOLIC_REWRITER.register_symbolic("aten::upsample_bicubic2d.vec", backend="onnx")
    def upsample_bicubic(x, output_size, align_corners, scale_factors):
        from onnxscript import opset18 as op
        ...

    table = SYMBOLIC_REWRITER.translation_table(backend="onnx")  # {torch.ops.aten...vec: upsample_bicubic}

Targets: ``"namespace::op"`` or ``"namespace::op.overload"`` (overload ``default`` when left out),
``"torch.ops.namespace.op.overload"``, or the dotted path of an object that is a graph target (a
``torch.library.custom_op`` is taken as its op overload). A custom op must be defined (its module
imported) before the table is built.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from vlm.errors import reason
from vlm.registry import SYMBOLIC_REWRITERS
from vlm.rewrite.records import (
    DOTTED,
    RewriterError,
    RewriterRecord,
    RewriterTable,
    check_backend,
    decorator_or_register,
)
from vlm.rewrite.targets import find_slot

ONNX_BACKEND = "onnx"
_OP_NAME = re.compile(r"^[A-Za-z_]\w*::[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")
_TARGET = re.compile(f"{_OP_NAME.pattern}|{DOTTED.pattern}")


class SymbolicRewriter:
    """``SYMBOLIC_REWRITER``: export translations per backend (``onnx``)."""

    def __init__(self) -> None:
        self.table = RewriterTable(
            "symbolic",
            SYMBOLIC_REWRITERS,
            "an op name like 'aten::gelu', 'aten::upsample_bicubic2d.vec' or 'torch.ops.mylib.op.default', "
            "or a dotted path",
            _TARGET,
        )

    def register_symbolic(
        self,
        op_or_func_name: str,
        backend: str = ONNX_BACKEND,
        *,
        priority: int = 0,
        owner: str | None = None,
        location: str | None = None,
        **extra: Any,
    ) -> Any:
        """Translate ``op_or_func_name`` with the decorated function when exporting for ``backend``;
        with ``location="pkg.mod:func"`` a lazy registration. ``priority`` and ``owner`` as for
        function rewriters; ``extra`` is kept on the record."""
        owner = owner or sys._getframe(1).f_globals.get("__name__", "?")
        return decorator_or_register(
            lambda function: self.table.add(op_or_func_name, backend, function, owner, priority, extra), location
        )

    def remove(self, op_or_func_name: str, backend: str = ONNX_BACKEND, owner: str | None = None) -> None:
        self.table.remove(op_or_func_name, backend, owner)

    def records(self) -> list[RewriterRecord]:
        return self.table.records()

    def translation_table(self, backend: str = ONNX_BACKEND) -> dict[Any, Any]:
        """``{graph target: translation}`` for ``torch.onnx.export(..., dynamo=True,
        custom_translation_table=...)``: the rewriters of ``backend``, else ``default``."""
        check_backend(backend, "translation_table")
        table: dict[Any, Any] = {}
        for _, record in sorted(self.table.choose(backend).items()):
            op = resolve_graph_target(record)
            if op is not None:
                table[op] = record.load()
        return table


def resolve_graph_target(record: RewriterRecord) -> Any:
    """The exporter's key for ``record.target``; ``None`` when its package is not installed."""
    name = record.target
    if "::" in name:
        namespace, _, rest = name.partition("::")
    elif name.startswith("torch.ops."):
        namespace, _, rest = name.removeprefix("torch.ops.").partition(".")
    else:
        slot = find_slot(record)
        return None if slot is None else _as_graph_target(record, slot.read()[1])
    import torch

    op_name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), op_name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError) as exc:
        raise RewriterError(
            f"symbolic rewriter {record.label()} targets {name!r}, which is not a registered torch op "
            f"({reason(exc)}); import the module that defines the op first, or fix the name"
        ) from None


def _as_graph_target(record: RewriterRecord, obj: Any) -> Any:
    import torch

    if isinstance(obj, torch._ops.OpOverloadPacket):
        return obj.default
    overload = getattr(obj, "_opoverload", None)  # a torch.library.custom_op
    if isinstance(overload, torch._ops.OpOverload):
        return overload
    if not callable(obj):
        raise RewriterError(f"symbolic rewriter {record.label()} targets {record.target!r}, which is not callable")
    return obj


SYMBOLIC_REWRITER = SymbolicRewriter()
