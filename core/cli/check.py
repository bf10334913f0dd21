"""``vlmrun check``: validate config, tokenizer and weights without loading any tensor data.

The model is built on the ``meta`` device and the checkpoint is read as shapes only
(safetensors headers), through the same ``load_weights`` mapping a real load uses.
"""

from __future__ import annotations

import json
from argparse import Namespace

from vlm.errors import VlmError


def check_command(args: Namespace) -> int:
    import torch

    from vlm.config import load_model_config
    from vlm.loader import checkpoint_files, load_model, load_tokenizer, resolve_model_path
    from vlm.quantization import checkpoint_quantization

    model_dir = resolve_model_path(args.model, args.allow_download)
    config = load_model_config(model_dir)
    files = checkpoint_files(model_dir)
    model, plugin, report = load_model(config, torch.float32, torch.device("meta"), args.plugin, strict=False)
    checkpoint_format = checkpoint_quantization(config.hf_config)
    quantization = None
    if checkpoint_format is not None:
        layers = sum(getattr(m, "quant_config", None) is not None for m in model.modules())
        quantization = f"{checkpoint_format.describe()}, {layers} linear layers quantized"
    problems = []
    try:
        tokenizer = load_tokenizer(model_dir)
        tokenizer_summary = f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"
    except VlmError as exc:
        tokenizer_summary = f"FAILED: {exc}"
        problems.append(str(exc))
    result = {
        "model": str(model_dir),
        "plugin": plugin,
        "config": config.summary(),
        "tokenizer": tokenizer_summary,
        "checkpoint_files": [f.path.name for f in files],
        "quantization": quantization,
        "tensors_loaded": report.loaded,
        "missing": report.missing,
        "unexpected": report.unexpected,
        "mis_shaped": report.mismatched,
        "ok": report.ok and not problems,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: {model_dir}")
        print(f"plugin: {plugin}")
        print("config:")
        for key, value in config.summary().items():
            print(f"  {key}: {value}")
        print(f"tokenizer: {tokenizer_summary}")
        print(f"checkpoint: {', '.join(f.path.name for f in files)} ({report.loaded} tensors match)")
        if quantization is not None:
            print(f"quantization: {quantization}")
        for label, names in (
            ("missing", report.missing),
            ("unexpected", report.unexpected),
            ("mis-shaped", report.mismatched),
        ):
            if names:
                print(f"{label} ({len(names)}):")
                for name in names:
                    print(f"  {name}")
        print("OK" if result["ok"] else "PROBLEMS FOUND")
    return 0 if result["ok"] else 1
