"""The engine flags shared by ``vlmrun run``, ``serve`` and ``bench`` (each an EngineConfig field)."""

from __future__ import annotations

import argparse
from typing import Any

# flag destination -> EngineConfig field
_FIELDS = {
    "dtype": "dtype",
    "device": "device",
    "max_model_len": "max_model_len",
    "kv_cache_gib": "kv_cache_gib",
    "threads": "num_threads",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "tp": "tensor_parallel_size",
    "quantize": "quantization",
    "quantization_group_size": "quantization_group_size",
    "min_pixels": "min_pixels",
    "max_pixels": "max_pixels",
    "max_num_tiles": "max_num_tiles",
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine (defaults: vlm.config.EngineConfig)")
    engine.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: on CPU the checkpoint's bf16 where the CPU computes it natively, else float32; the checkpoint's on GPU",
    )
    engine.add_argument("--device", help="auto (default), cpu or cuda")
    engine.add_argument("--max-model-len", type=int, help="prompt + generated tokens per sequence")
    engine.add_argument("--kv-cache-gib", type=float, help="memory budget of the KV cache (default 2)")
    engine.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    engine.add_argument("--max-num-seqs", type=int, help="sequences decoded together per step (default 64)")
    engine.add_argument(
        "--max-num-batched-tokens", type=int, help="tokens in one forward step (default 512 on CPU, 2048 on GPU)"
    )
    engine.add_argument(
        "--tp",
        "--tensor-parallel-size",
        dest="tp",
        type=int,
        metavar="N",
        help="shard the model over N processes on this machine (CPU); this one serves",
    )
    engine.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prefixes")
    engine.add_argument(
        "--quantize",
        choices=["int8", "int4", "w8a8"],
        help="quantize the language model on the fly: weights to int8 (per output channel) or int4 (group-wise), "
        "or w8a8: int8 weights and int8 activations per token (fastest on CPUs with VNNI)",
    )
    engine.add_argument(
        "--quantization-group-size",
        type=int,
        choices=[32, 64, 128],
        metavar="{32,64,128}",
        help="int4: input features per scale and zero point (default 128)",
    )
    engine.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower and projector too")
    engine.add_argument(
        "--no-quantize-lm-head",
        action="store_true",
        help="with --quantize: keep the LM head in the model's dtype (default: int8 per vocabulary row)",
    )
    engine.add_argument(
        "--min-pixels",
        type=int,
        metavar="N",
        help="image budget (Qwen2-VL): enlarge pictures below N pixels (default: preprocessor_config.json)",
    )
    engine.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="image budget (Qwen2-VL): shrink pictures above N pixels, about N/784 image tokens "
        "(default: preprocessor_config.json)",
    )
    engine.add_argument(
        "--max-num-tiles",
        type=int,
        metavar="N",
        help="image budget (InternVL): at most N tiles per picture, plus a thumbnail when several "
        "(256 tokens per 448-px tile; default: the checkpoint's max_patches / max_dynamic_patch)",
    )


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keyword arguments the user set (unset flags keep EngineConfig's defaults)."""
    settings = {field: getattr(args, flag) for flag, field in _FIELDS.items() if getattr(args, flag, None) is not None}
    for name in ("plugin", "allow_download", "quantize_vision"):
        if getattr(args, name, None):
            settings[name] = getattr(args, name)
    if getattr(args, "no_prefix_caching", False):
        settings["enable_prefix_caching"] = False
    if getattr(args, "no_quantize_lm_head", False):
        settings["quantize_lm_head"] = False
    return settings
