"""Exporting a part of a model for other runtimes: ``vlmrun export``.

:func:`vlm.export.onnx.export_vision_onnx` writes a vision-language model's vision part (the
tower and projector behind its ``embed_images``) as an ONNX graph and checks it with onnxruntime
against the torch model. Nothing here names a model family: a plugin's model says through its
``embed_images`` what the part computes, and through ``vision_export_inputs`` which of an
image's ``ImageInput.extra`` entries the graph takes as inputs.
"""

from vlm.rewrite import FUNCTION_REWRITER, ONNX_BACKEND

# What the ONNX exporter cannot take as the engine runs it (torch-free here: the functions load
# from vlm.export.rewrites when an export enters the onnx context):
# - oneDNN-packed weights are a private op: keep linears dense;
# - the rotary table is sized from values in a graph input: compute cos/sin directly.
FUNCTION_REWRITER.register_rewriter(
    "vlm.nn.linear.PackableLinear.prepare_for_inference",
    ONNX_BACKEND,
    owner="vlm.export",
    location="vlm.export.rewrites:keep_dense_weight",
)
FUNCTION_REWRITER.register_rewriter(
    "vlm.nn.rotary.RotaryEmbedding.cos_sin",
    ONNX_BACKEND,
    owner="vlm.export",
    location="vlm.export.rewrites:computed_cos_sin",
)
