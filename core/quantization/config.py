"""The quantization setting a model is built with, and the error a layer that cannot take it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from vlm.errors import ConfigError

Scheme = Literal["int8", "int4", "w8a8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
#: the int4 group sizes offered; torch's CPU kernel also takes 256, which loses too much accuracy
GROUP_SIZES = (32, 64, 128)


class QuantizationError(ConfigError, ValueError):
    """A layer (or setting) that cannot be quantized as asked; one line naming the sizes and the fix.

    A :class:`ConfigError` so that ``vlmrun`` prints it as ``error: ...``, and a ``ValueError``
    for callers that expect bad values to be one.
    """


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of a model's linear layers.

    :param scheme: weight-only ``"int8"``: one symmetric scale per output channel; ``"int4"``: an
        asymmetric scale and zero point per group of ``group_size`` input features; and ``"w8a8"``:
        int8's weights with each input row quantized to int8 at run time, for the CPU's integer
        dot products (:mod:`vlm.quantization.w8a8`).
    :param group_size: int4 only; every quantized layer's input features (per tensor-parallel rank)
        must be a whole number of groups.
    :param quantize_vision: also quantize the vision tower and projector (by default only the
        language model is: vision towers are small next to it and lose more accuracy).
    :param quantize_lm_head: quantize the LM head too, to int8 per output channel whatever the
        scheme (:data:`LM_HEAD`; W8A8 under ``"w8a8"``); a tied embedding then reads its rows from
        the int8 table.
    :param keep_dense: names of modules to leave unquantized (a pre-quantized checkpoint's
        ``modules_to_not_convert`` / ``ignore``); see :func:`vlm.quantization.keeps_dense`.
    """

    scheme: Scheme
    group_size: int = 128
    quantize_vision: bool = False
    quantize_lm_head: bool = True
    keep_dense: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"quantization scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise QuantizationError(f"quantization group size {self.group_size} is not one of {sizes}")

    def lm_head_config(self) -> QuantConfig | None:
        """What the LM head is quantized with under this setting: :data:`LM_HEAD`, or None (dense)."""
        if not self.quantize_lm_head:
            return None
        return LM_HEAD_W8A8 if self.scheme == "w8a8" else LM_HEAD

    def describe(self) -> str:
        if self.scheme == "int4":
            return f"int4 (groups of {self.group_size})"
        return "w8a8 (int8 weights and activations)" if self.scheme == "w8a8" else self.scheme


#: The LM head's quantization under every scheme: int8, one scale per vocabulary row. The head
#: is the largest single matrix of a small model (Qwen2-0.5B: 136M of 494M parameters) and read
#: whole at every decode step, so it is worth quantizing; but its errors go straight into the
#: logits, so it stays at 8 bits under int4 as well, as llama.cpp keeps ``output.weight`` above
#: the model's 4 bits (its quantizer writes Q6_K for the output layer of a Q4_0 model, or Q8_0
#: where the row length is not a multiple of Q6_K's 256-value blocks, as Qwen2-0.5B's 896).
LM_HEAD = QuantConfig("int8", quantize_lm_head=False)
#: The LM head under ``"w8a8"``: the same int8 codes and scales, with int8 activations.
LM_HEAD_W8A8 = QuantConfig("w8a8", quantize_lm_head=False)
