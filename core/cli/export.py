"""``vlmrun export``: a part of a model (the vision tower) as an ONNX file."""

from __future__ import annotations

import argparse

from vlm.errors import VlmError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["vision"], default="vision", help="which part of the model to export")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    parser.add_argument("-o", "--output", required=True, help="the file to write")


def export_command(args: argparse.Namespace) -> int:
    raise VlmError("vlmrun export is not implemented yet")
