"""Rewriters per backend, in the shape of mmdeploy's: function, module and symbolic.

::

    from vlm.rewrite import FUNCTION_REWRITER, MODULE_REWRITER, SYMBOLIC_REWRITER, RewriterContext, patch_model

    @FUNCTION_REWRITER.register_rewriter(func_name="vlm.kernels.rms_norm", backend="cuda")
    def rms_norm_with_my_kernel(x, weight, eps):
        ctx = FUNCTION_REWRITER.get_context()          # ctx.origin_func, ctx.cfg, ctx.backend
        if x.shape[-1] % 128:
            return ctx.origin_func(x, weight, eps)
        return my_kernel(x, weight, eps)

    @MODULE_REWRITER.register_rewrite_module("transformers.models.siglip.modeling_siglip.SiglipAttention")
    class PagedSiglipAttention(torch.nn.Module):
        def __init__(self, module, cfg, **kwargs): ...

    with RewriterContext(cfg, backend="cuda"):         # patched inside, restored on exit (also on error)
        ...
    model = patch_model(model, cfg, backend="cpu")     # every instance of a rewritten module class replaced

Rules every kind shares (:mod:`vlm.rewrite.records`):

- A rewriter is registered for a dotted *target* and a *backend*: ``default``, or the engine's
  device type (``cpu``, ``cuda``, ...), or ``onnx`` for export. On a backend, a target's rewriter
  registered for that backend wins over its ``default`` one.
- Two rewriters of one target and backend from two owners (the registering modules) are an error
  naming both when a context (or ``patch_model``, or the table) needs them, unless their
  ``priority=`` differs: the higher wins.
- Registering records the dotted name only; the target's module is imported when a context (or
  ``patch_model``, or the table) first needs it, and a target whose top-level package is not
  installed is skipped. ``location="pkg.mod:attr"`` registers the rewriter itself lazily too, so a
  plugin's torch-free ``__init__`` can ship rewriters. Register at import time of the plugin: a
  context already entered does not see later registrations (the next one does).
- Rewriters live in :mod:`vlm.registry`'s ``FUNCTION_REWRITERS``, ``MODULE_REWRITERS`` and
  ``SYMBOLIC_REWRITERS`` (a child scope per owner, entries ``"<target>@<backend>"``);
  ``vlmrun plugins --rewriters`` lists them (:func:`describe_rewriters`) without importing torch.

The engine loads the plugins, then enters ``RewriterContext(engine_config, backend=device.type)``
around building and loading the model (and patches it with ``patch_model`` for that backend) and
around every forward step. See :mod:`vlm.rewrite.context` for what is and is not thread-safe.

Export (the API ``vlmrun export`` uses)::

    from vlm.rewrite import SYMBOLIC_REWRITER, RewriterContext

    with RewriterContext(cfg, backend="onnx"):  # function rewriters registered for "onnx" (or "default")
        program = torch.onnx.export(
            tower, (pixel_values,), dynamo=True,
            custom_translation_table=SYMBOLIC_REWRITER.translation_table(backend="onnx"),
        )

``translation_table(backend)`` returns ``{torch op overload (e.g. torch.ops.aten.gelu.default):
translation function}``, built from the symbolic rewriters of that backend (else ``default``);
it imports torch but never onnxscript (the functions import it when the exporter runs them).
"""

from __future__ import annotations

from typing import Any

from vlm.rewrite.context import RewriterContext
from vlm.rewrite.function import FUNCTION_REWRITER, FunctionRewriteContext, FunctionRewriter
from vlm.rewrite.module import MODULE_REWRITER, ModuleRewriter, patch_model
from vlm.rewrite.records import DEFAULT_BACKEND, RewriterError, RewriterRecord
from vlm.rewrite.symbolic import ONNX_BACKEND, SYMBOLIC_REWRITER, SymbolicRewriter


def all_records() -> list[RewriterRecord]:
    """Every registered rewriter: function, then module, then symbolic ones."""
    return [*FUNCTION_REWRITER.records(), *MODULE_REWRITER.records(), *SYMBOLIC_REWRITER.records()]


def describe_rewriters() -> list[dict[str, Any]]:
    """One row per rewriter (kind, target, backend, owner, priority, location); imports nothing."""
    return [record.as_dict() for record in all_records()]


__all__ = [
    "DEFAULT_BACKEND",
    "FUNCTION_REWRITER",
    "MODULE_REWRITER",
    "ONNX_BACKEND",
    "SYMBOLIC_REWRITER",
    "FunctionRewriteContext",
    "FunctionRewriter",
    "ModuleRewriter",
    "RewriterContext",
    "RewriterError",
    "RewriterRecord",
    "SymbolicRewriter",
    "all_records",
    "describe_rewriters",
    "patch_model",
]
