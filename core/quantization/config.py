"""The quantization setting a model is built with, and the error a layer that cannot take it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from vlm.errors import ConfigError

Scheme = Literal["int8", "int4"]
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
    """Weight-only quantization of a model's linear layers.

    :param scheme: ``"int8"``: one symmetric scale per output channel; ``"int4"``: an asymmetric
        scale and zero point per group of ``group_size`` input features.
    :param group_size: int4 only; every quantized layer's input features (per tensor-parallel rank)
        must be a whole number of groups.
    :param quantize_vision: also quantize the vision tower and projector (by default only the
        language model is: vision towers are small next to it and lose more accuracy).
    """

    scheme: Scheme
    group_size: int = 128
    quantize_vision: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"quantization scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise QuantizationError(f"quantization group size {self.group_size} is not one of {sizes}")

    def describe(self) -> str:
        return f"int4 (groups of {self.group_size})" if self.scheme == "int4" else self.scheme
