"""Weight-only quantization of the ``vlm.nn`` linear layers, on the fly: int8 and int4.

How a model gets quantized, and why this way:

1. The model is built and its checkpoint loaded exactly as without quantization: the linear
   layers hold their rank's full-precision slice, so tensor-parallel sharding and every weight
   loader stay as they are, and no plugin's model file changes.
2. Between building and loading, :func:`assign_quant_config` (called by ``vlm.loader.load_model``
   with the engine's ``--quantize`` setting) gives a :class:`QuantConfig` to each linear layer to
   be quantized. Each layer checks at once that it can take it: a layer that cannot (an int4
   group that a tensor-parallel split would cut) is a one-line error before any weight is read.
3. Each layer quantizes its weight (:func:`quantize`) and frees the dense one as soon as all of
   it has loaded, so that loading holds one layer in full precision at a time rather than the
   whole model (measured on the Qwen2-0.5B shape, fp32 checkpoint: peak anonymous memory while
   loading with int8 2.5 -> 1.5 GB, int4 2.1 -> 1.2 GB); ``prepare_for_inference``, which
   repacks the other layers' weights after loading, quantizes any layer not done yet (and a tied
   LM head, whose table the embedding reads until then).

Which layers: every ``vlm.nn`` linear layer (``build_*_linear``, ``build_qkv_proj``) of the
*language model*. In a vision-language model (``vlm.nn.VisionLanguageModel``) that is the
``language_model`` submodule: the vision tower and projector stay in the model's dtype unless
``QuantConfig.quantize_vision``. The rule is a module-name prefix, decided once the model exists,
so it needs nothing from plugins. The LM head (``vlm.nn.ParallelLMHead``) is quantized too, to
int8 per vocabulary row under every scheme (:data:`vlm.quantization.config.LM_HEAD`), unless
``QuantConfig.quantize_lm_head`` is off; a tied embedding then looks its rows up in the int8
table. Untied embeddings stay dense (a lookup reads a few rows, not the table). Modules named by
``QuantConfig.keep_dense`` (a pre-quantized checkpoint's own exceptions) stay dense:
:func:`keeps_dense`.

A plugin may still choose for itself: every builder takes ``quant_config=``; a layer built with one
keeps it, whatever the engine setting.

Schemes: :mod:`vlm.quantization.int8` (per output channel, symmetric) and
:mod:`vlm.quantization.int4` (group-wise with zero points), weight-only; each has ``quantize`` and
a weight class whose ``matmul`` is torch's CPU kernel for the scheme, with a dequantize +
``F.linear`` fallback for other devices and dtypes. :mod:`vlm.quantization.w8a8` keeps int8's
weights and quantizes each input row to int8 as well, for the CPU's integer dot products.

Pre-quantized checkpoints: :mod:`vlm.quantization.formats` reads AWQ (GEMM), GPTQ and
compressed-tensors (:mod:`vlm.quantization.compressed`, also what ``vlmrun quantize`` writes)
checkpoints as dense weights while they load; ``load_model`` then quantizes them again with the
matching scheme here (:meth:`CheckpointFormat.requantization`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from vlm.quantization import int4, int8, w8a8
from vlm.quantization.base import QuantizedWeight, cpu_kernel_dtype
from vlm.quantization.config import GROUP_SIZES, SCHEMES, QuantConfig, QuantizationError, Scheme
from vlm.quantization.formats import CheckpointFormat, checkpoint_quantization, dequantized_weights

logger = logging.getLogger("vlm")

#: where a vision-language model keeps its language model (``vlm.nn.VisionLanguageModel``)
LANGUAGE_MODEL = "language_model"


def check_input_features(config: QuantConfig, in_features: int) -> str | None:
    """Why a layer with ``in_features`` inputs (on this rank) cannot take ``config``, or None."""
    if config.scheme == "int4" and in_features % config.group_size:
        fits = [str(size) for size in GROUP_SIZES if in_features % size == 0]
        hint = f"use --quantization-group-size {' or '.join(fits)}" if fits else "use --quantize int8"
        return f"{in_features} input features are not a whole number of int4 groups of {config.group_size}; {hint}"
    return None


def quantize(
    weight: torch.Tensor, config: QuantConfig, row_absmax: torch.Tensor | None = None, keep_codes: bool = False
) -> QuantizedWeight:
    """A dense ``[out, in]`` weight, quantized into the fastest layout for its device and dtype
    (the activations are taken to have the weight's dtype).

    :param row_absmax: each row's largest magnitude over the whole row, when ``weight`` is a
        slice of the input features (see :func:`vlm.quantization.int8.quantize`); int4 groups
        never span slices and need none.
    :param keep_codes: W8A8: keep the int8 codes beside the kernel's packed copy (a tied
        embedding looks rows up in them).
    """
    compute = cpu_kernel_dtype(weight.dtype) if weight.device.type == "cpu" else weight.dtype
    if config.scheme == "int8":
        return int8.quantize(weight, compute, row_absmax)
    if config.scheme == "w8a8":
        return w8a8.quantize(weight, compute, row_absmax, keep_codes=keep_codes)
    portable = int4.quantize(weight, config.group_size, compute)
    return portable.for_cpu_kernel(compute) or portable


def quantized_prefix(model: nn.Module, config: QuantConfig) -> str:
    """The module-name prefix of the layers ``config`` quantizes: the language model's."""
    if config.quantize_vision or not isinstance(getattr(model, LANGUAGE_MODEL, None), nn.Module):
        return ""
    return LANGUAGE_MODEL + "."


#: fused ``vlm.nn`` layers and the checkpoint layers each holds (the names plugins use); a
#: checkpoint that keeps any of the parts dense keeps the whole fused layer dense
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _checkpoint_names(name: str) -> list[str]:
    """The names a checkpoint may give the ``vlm`` module ``name``: its own, the language model's
    without the ``language_model.`` prefix (a causal LM's ``model.layers.0...``, ``lm_head``) and
    in transformers' VLM layout (``model.language_model.layers.0...``), each with a fused layer's
    parts."""
    names = [name]
    if name.startswith(LANGUAGE_MODEL + "."):
        inner = name.removeprefix(LANGUAGE_MODEL + ".")
        names.append(inner)
        if inner.startswith("model."):
            names.append("model." + LANGUAGE_MODEL + "." + inner.removeprefix("model."))
    parts = _FUSED_PARTS.get(name.rpartition(".")[2], ())
    return names + [f"{full.rpartition('.')[0]}.{part}".lstrip(".") for full in names for part in parts]


def keeps_dense(name: str, patterns: Iterable[str]) -> bool:
    """Whether the module ``name`` is one of ``patterns``, a checkpoint's list of modules left
    unquantized (AWQ's ``modules_to_not_convert``, compressed-tensors' ``ignore``).

    A pattern ``re:REGEX`` matches a name from its start (as compressed-tensors and vLLM match
    ``ignore``); a plain pattern matches a whole run of dotted components anywhere in it
    (``visual`` matches ``visual.blocks.0.attn.qkv``, ``mlp.gate`` matches ``...mlp.gate`` but not
    ``...mlp.gate_proj``). The checkpoint's names may differ from vlm's (see
    :func:`_checkpoint_names`); a fused layer stays dense if any of its parts does.
    """
    candidates = _checkpoint_names(name)
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern.removeprefix("re:"))
            if any(regex.match(candidate) for candidate in candidates):
                return True
        else:
            component = re.compile(rf"(^|\.){re.escape(pattern)}(\.|$)")
            if any(component.search(candidate) for candidate in candidates):
                return True
    return False


def assign_quant_config(model: nn.Module, config: QuantConfig | None, fallback: QuantConfig | None = None) -> list[str]:
    """Give ``config`` to every linear layer of ``model`` that it quantizes (those of the language
    model, see the module docstring) and that was not built with a config of its own; they
    quantize themselves in ``prepare_for_inference``. Returns their names.

    :param fallback: for the layers that cannot take ``config`` (a pre-quantized checkpoint's
        int4 group that does not fit a layer falls back to int8); None: they are an error.
    :raises QuantizationError: a layer cannot be quantized so (one line, naming it and the fix).
    """
    if config is None:
        return []
    prefix = quantized_prefix(model, config)
    names: list[str] = []
    fell_back = kept_dense = 0
    for name, module in model.named_modules():
        # duck-typed like prepare_for_inference: this package sits below vlm.nn and imports none of it
        assign = getattr(module, "set_quant_config", None)
        if assign is None or not name.startswith(prefix) or getattr(module, "quant_config", None) is not None:
            continue
        if config.keep_dense and keeps_dense(name, config.keep_dense):
            kept_dense += 1
            continue
        try:
            assign(config, name)
        except QuantizationError:
            if fallback is None:
                raise
            assign(fallback, name)
            fell_back += 1
        names.append(name)
    if fallback is not None and fell_back:
        logger.info(
            "quantizing %d linear layers to %s and %d that it does not fit to %s",
            len(names) - fell_back,
            config.describe(),
            fell_back,
            fallback.describe(),
        )
    else:
        logger.info("quantizing %d linear layers to %s", len(names), config.describe())
    if kept_dense:
        logger.info("%d layers stay dense, as the checkpoint keeps them", kept_dense)
    return names


__all__ = [
    "GROUP_SIZES",
    "SCHEMES",
    "CheckpointFormat",
    "QuantConfig",
    "QuantizationError",
    "QuantizedWeight",
    "Scheme",
    "assign_quant_config",
    "check_input_features",
    "checkpoint_quantization",
    "cpu_kernel_dtype",
    "dequantized_weights",
    "keeps_dense",
    "quantize",
]
