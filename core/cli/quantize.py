"""``vlmrun quantize``: write a model's checkpoint quantized, as a compressed-tensors checkpoint
that vlm, vLLM and transformers load (:mod:`vlm.quantization.compressed`)."""

from __future__ import annotations

import argparse
import os
from argparse import Namespace
from pathlib import Path

#: vlm.quantization.compressed's SCHEMES and DEFAULT_GROUP_SIZE, repeated so that building the
#: parser imports no torch (a test keeps them equal)
SCHEMES = ("w4a16", "w8a16")
DEFAULT_GROUP_SIZE = 128


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheme",
        required=True,
        choices=SCHEMES,
        help="int4 (w4a16) or int8 (w8a16) weights, a symmetric scale per group of input features",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help=f"input features per scale (default {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="a new directory for the quantized model")


def quantize_command(args: Namespace) -> int:
    import sys

    from vlm.loader import resolve_model_path
    from vlm.quantization.compressed import quantize_checkpoint, scheme_for

    model_dir = resolve_model_path(args.model, args.allow_download)
    scheme = scheme_for(args.scheme, args.group_size)
    print(f"quantizing {model_dir} to {scheme.describe()} ...", file=sys.stderr)
    report = quantize_checkpoint(model_dir, args.output, scheme, progress=os.isatty(2))
    print(report.summary(scheme))
    return 0
