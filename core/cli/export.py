"""``vlmrun export``: a part of a model (the vision tower) as an ONNX file."""

from __future__ import annotations

import argparse

from vlm.errors import VlmError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["vision"], default="vision", help="which part of the model to export")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    parser.add_argument("-o", "--output", required=True, help="the file to write")


def export_command(args: argparse.Namespace) -> int:
    """Export, check with onnxruntime, and print what was written (progress goes to stderr)."""
    try:
        import onnxruntime  # noqa: F401  (the graph is checked with it before it is written)
        import onnxscript  # noqa: F401  (torch's exporter translates with it)
    except ImportError as exc:
        raise VlmError(
            f"vlmrun export --format onnx needs {exc.name}, which is not installed; "
            "pip install 'vlm-core[export]' (onnx, onnxscript, onnxruntime)"
        ) from None
    from vlm.export.onnx import export_vision_onnx

    result = export_vision_onnx(args.model, args.output, plugin=args.plugin, allow_download=args.allow_download)
    print(result.summary())
    return 0
