"""The ``onnx`` backend's function rewriters: what the engine's layers do for speed that an
exported graph cannot hold, replaced while a model is loaded and traced for ONNX.

Registered with :data:`vlm.rewrite.FUNCTION_REWRITER` when this module is imported (``vlmrun
export`` imports it), so ``vlmrun plugins --rewriters`` lists them and a plugin can override one
with a higher ``priority``:

- ``PackableLinear.prepare_for_inference`` keeps the dense weights: oneDNN's packed layout runs
  through a private CPU op (``mkldnn._linear_pointwise``) that no ONNX runtime knows, whereas a
  dense weight exports as a plain ``MatMul``. (No quantization either: the graph is float32.)
- ``RotaryEmbedding.cos_sin`` computes cos / sin of the positions it is given instead of
  indexing a table sized by ``positions.max()``: the table's length would depend on the values of
  a graph input, which ``torch.export`` cannot trace. The products are the same, so are the results.

Ops the exporter cannot translate get a translation through
:data:`vlm.rewrite.SYMBOLIC_REWRITER` (``register_symbolic(op, backend="onnx")``); the
first-party towers need none, so this module registers none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vlm.rewrite import ONNX_BACKEND, SYMBOLIC_REWRITER, RewriterContext


# registered lazily (by location) in vlm.export's __init__, so `vlmrun plugins --rewriters` lists them
def keep_dense_weight(self: Any) -> None:
    """No packing, no quantization: the weight stays a dense float tensor."""


def computed_cos_sin(self: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T]`` positions -> cos, sin ``[T, rotary_dim // 2]``, without the table."""
    freqs = positions.to(torch.float)[:, None] * self.inv_freq.to(positions.device)
    return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def onnx_rewrites(cfg: Any = None) -> RewriterContext:
    """The context that applies the ``onnx`` backend's function rewriters (restored on exit)."""
    return RewriterContext(cfg, backend=ONNX_BACKEND)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: every ``onnx`` symbolic rewriter."""
    return SYMBOLIC_REWRITER.translation_table(backend=ONNX_BACKEND)
