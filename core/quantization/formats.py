"""Pre-quantized checkpoints (AWQ, GPTQ, compressed-tensors), read as dense weights while they load.

A checkpoint quantized by AutoAWQ / AutoGPTQ / GPTQModel (or saved through transformers) says so
in its config's ``quantization_config``, and stores each quantized linear layer ``{prefix}`` as
packed int32 codes ``{prefix}.qweight``, packed zero points ``{prefix}.qzeros``, scales
``{prefix}.scales`` and, for GPTQ, the group of each input feature ``{prefix}.g_idx``.
:func:`dequantized_weights` wraps the checkpoint's ``(name, tensor)`` stream and turns each such
layer into one dense ``{prefix}.weight`` ``[out, in]`` (``{prefix}.bias`` passes through), so
every weight loader, fused-parameter mapping and tensor-parallel split works unchanged. A GPTQ
export's all-zero ``bias`` of a bias-free layer is dropped (``vlm.nn.weights.mark_optional``).
``vlm.loader.load_model`` then quantizes the layers again on the fly with the matching scheme
of this package (:meth:`CheckpointFormat.requantization`), unless asked to keep them dense.

The layouts, as the formats' reference exporters write them (AutoAWQ's ``WQLinear_GEMM`` and
AutoGPTQ's ``QuantLinear.pack``; vLLM and transformers read the same). In both, one int32 word
holds ``32 / bits`` codes, the first in its lowest bits, and ``w = (q - zero) * scale``:

- AWQ, ``version: "gemm"``, 4-bit: codes packed along the *output* features, eight per word in
  the order ``AWQ_PACK_ORDER`` (word ``c`` of a row holds output features ``8c + 0, 8c + 2, ...,
  8c + 7`` from its lowest nibble up): ``qweight [in, out / 8]``, ``qzeros [in / group, out / 8]``
  (same order), ``scales [in / group, out]``. Input feature ``i`` is in group ``i // group``.
- GPTQ (the ``"gptq"`` checkpoint format, v1), 4- or 8-bit: codes packed along the *input*
  features in natural order: ``qweight [in * bits / 32, out]``; ``qzeros [groups, out * bits / 32]``
  along the output features, each stored as ``zero - 1`` (add 1 back; GPTQModel's ``"gptq_v2"``
  stores ``zero`` itself); ``scales [groups, out]``; ``g_idx [in]``, the group of each input
  feature: ``i // group`` normally, any assignment with ``desc_act`` (act-order). A checkpoint
  without ``g_idx`` gets ``i // group`` unless it says ``desc_act``.

The dense weight is computed in float32, where ``(q - zero) * scale`` of an fp16 or bf16 scale
is exact; loading casts it once to the model's dtype. Anything else (another method, AWQ's GEMV
or Marlin layouts, GPTQ with 2 or 3 bits) is a one-line :class:`QuantizationError`, never a guess.

compressed-tensors (``pack-quantized`` W4A16 / W8A16, also what ``vlmrun quantize`` writes) is
read through its own library: :mod:`vlm.quantization.compressed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from vlm.errors import WeightsError
from vlm.quantization import compressed
from vlm.quantization.config import GROUP_SIZES, QuantConfig, QuantizationError

Method = Literal["awq", "gptq", "compressed-tensors"]

#: output feature held by each nibble of an AWQ GEMM word, lowest nibble first
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: the nibble holding each output feature of an AWQ GEMM word (the inverse of AWQ_PACK_ORDER)
AWQ_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(feature) for feature in range(8))

SUPPORTED = "awq (4-bit, GEMM), gptq (4- or 8-bit) and compressed-tensors (pack-quantized W4A16 / W8A16)"
_GPTQ_BITS = (4, 8)
_GPTQ_CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # -> what is added to each stored zero point


@dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint's linear layers are quantized (its ``quantization_config``).

    :param group_size: input features per scale; -1: one group spanning each whole row.
    :param zero_offset: added to each stored zero point (1 for GPTQ v1, which stores ``zero - 1``).
    :param keep_dense: the modules the checkpoint leaves unquantized (AWQ's and transformers'
        ``modules_to_not_convert``, compressed-tensors' ``ignore``), as it names them.
    :param lm_head: whether the checkpoint quantizes its LM head (GPTQ's ``lm_head: true``);
        every other format and exporter keeps it dense.
    """

    method: Method
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    keep_dense: tuple[str, ...] = ()
    lm_head: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors each quantized layer stores (GPTQ's ``g_idx`` may be absent, see the module docstring)."""
        if self.method == "compressed-tensors":
            return self._compressed_scheme().parts
        return ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else ("qweight", "qzeros", "scales")

    @property
    def required_parts(self) -> tuple[str, ...]:
        return tuple(part for part in self.parts if part != "g_idx")

    def _compressed_scheme(self) -> compressed.WeightScheme:
        return compressed.WeightScheme(self.bits, self.group_size, self.sym)

    def describe(self) -> str:
        """E.g. ``AWQ 4-bit (GEMM), group 128`` or ``GPTQ 8-bit, group 32, desc_act``."""
        if self.method == "compressed-tensors":
            return self._compressed_scheme().describe()
        layout = " (GEMM)" if self.method == "awq" else ""
        group = "per row" if self.group_size == -1 else f"group {self.group_size}"
        act_order = ", desc_act" if self.desc_act else ""
        return f"{self.method.upper()} {self.bits}-bit{layout}, {group}{act_order}"

    def requantization(self) -> tuple[QuantConfig, QuantConfig | None]:
        """The on-the-fly scheme that keeps the model about as small, and one for the layers it
        does not fit: 4-bit -> int4 with the checkpoint's group size where the layer takes it
        (and that size is offered), else int8; 8-bit -> int8.

        The layers the checkpoint keeps dense (:attr:`keep_dense`, and the LM head unless it is
        quantized there) stay dense: requantizing must not quantize what the exporter chose not to.
        """
        int8 = QuantConfig("int8", quantize_lm_head=self.lm_head, keep_dense=self.keep_dense)
        if self.bits == 4 and self.group_size in GROUP_SIZES:
            return replace(int8, scheme="int4", group_size=self.group_size), int8
        return int8, None

    def dequantize(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense float32 ``[out, in]`` weight of the layer stored as ``tensors`` (its parts)."""
        g_idx = tensors.get("g_idx")
        if self.method == "compressed-tensors":
            return compressed.dequantize(self._compressed_scheme(), prefix, tensors)
        if self.method == "awq":
            return dequantize_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], prefix=prefix)
        if g_idx is None and self.desc_act:
            raise WeightsError(f"GPTQ layer {prefix} has no g_idx, which desc_act needs; the checkpoint is incomplete")
        return dequantize_gptq(
            tensors["qweight"],
            tensors["qzeros"],
            tensors["scales"],
            g_idx,
            self.bits,
            self.group_size,
            zero_offset=self.zero_offset,
            prefix=prefix,
        )


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def _quantization_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config``: at the top of config.json or, in some VLMs, in
    the nested text config."""
    candidates = [hf_config]
    get_text_config = getattr(hf_config, "get_text_config", None)
    if callable(get_text_config):
        candidates.append(get_text_config())
    for config in candidates:
        found = getattr(config, "quantization_config", None)
        if found is not None:
            return _as_dict(found)
    return None


def checkpoint_quantization(hf_config: Any) -> CheckpointFormat | None:
    """How the checkpoint of ``hf_config`` (transformers' config, or config.json read raw) is
    quantized, or None when it is not.

    :raises QuantizationError: a method or layout that is not read (one line naming it and what is).
    """
    config = _quantization_config(hf_config)
    if config is None:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "awq":
        return _with_exceptions(_awq_format(config), config)
    if method == "gptq":
        return _with_exceptions(_gptq_format(config), config)
    if method == compressed.METHOD:
        scheme = compressed.read_scheme(config)
        found = CheckpointFormat("compressed-tensors", scheme.bits, scheme.group_size, sym=scheme.symmetric)
        return _with_exceptions(found, config, extra_key="ignore")
    named = f"quant_method {method!r}" if method else "a quantization_config without quant_method"
    raise QuantizationError(
        f"the checkpoint is quantized with {named}, which vlm does not read; supported: {SUPPORTED}"
    )


def _names(value: Any, key: str) -> tuple[str, ...]:
    """A list of module names from the quantization config (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise QuantizationError(
            f"the checkpoint's quantization_config {key!r} is {value!r}, not a list of module names; fix config.json"
        )
    return tuple(value)


def _with_exceptions(found: CheckpointFormat, config: dict[str, Any], extra_key: str | None = None) -> CheckpointFormat:
    """``found`` with the modules the checkpoint keeps dense and whether it quantizes its LM head."""
    keep = _names(config.get("modules_to_not_convert"), "modules_to_not_convert")
    if extra_key is not None:
        keep += _names(config.get(extra_key), extra_key)
    return replace(found, keep_dense=keep, lm_head=bool(config.get("lm_head", False)))


def _awq_format(config: dict[str, Any]) -> CheckpointFormat:
    version = str(config.get("version", "gemm")).lower()
    if str(config.get("backend", "autoawq")).lower() == "llm-awq":  # MIT's original exporter packs otherwise
        version = "llm-awq"
    bits = int(config.get("bits", config.get("w_bit", 4)))
    if version != "gemm" or bits != 4:
        raise QuantizationError(
            f"the checkpoint is AWQ {bits}-bit in the {version!r} layout, which vlm does not read; "
            f"supported: {SUPPORTED}"
        )
    if not config.get("zero_point", True):
        raise QuantizationError(
            f"the checkpoint is AWQ without zero points (zero_point: false), which vlm does not read; "
            f"supported: {SUPPORTED}"
        )
    group_size = int(config.get("group_size", config.get("q_group_size", 128)))
    return CheckpointFormat("awq", bits, group_size)


def _gptq_format(config: dict[str, Any]) -> CheckpointFormat:
    bits = int(config.get("bits", 4))
    checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
    if bits not in _GPTQ_BITS or checkpoint_format not in _GPTQ_CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"the checkpoint is GPTQ {bits}-bit in the {checkpoint_format!r} checkpoint format, which vlm "
            f"does not read; supported: {SUPPORTED}"
        )
    return CheckpointFormat(
        "gptq",
        bits,
        int(config.get("group_size", 128)),
        desc_act=bool(config.get("desc_act", False)),
        sym=bool(config.get("sym", True)),
        zero_offset=_GPTQ_CHECKPOINT_FORMATS[checkpoint_format],
    )


# -- unpacking --------------------------------------------------------------------------------


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-bit codes of an int32 ``[rows, cols]`` tensor, ``32 / bits`` per word with the
    first in the lowest bits, laid out along ``dim``: ``[rows * 32 / bits, cols]`` (``dim=0``) or
    ``[rows, cols * 32 / bits]`` (``dim=1``); int32 in ``[0, 2**bits)``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    # an arithmetic shift of a negative word fills with ones, which the mask drops
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, cols, per word]
    rows, cols, per_word = codes.shape
    if dim == 0:
        return codes.permute(0, 2, 1).reshape(rows * per_word, cols)
    return codes.reshape(rows, cols * per_word)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM's 4-bit codes (``qweight`` or ``qzeros``, ``[rows, out / 8]``) in output-feature
    order: ``[rows, out]``."""
    codes = unpack_int32(packed, 4, dim=1)
    rows, out = codes.shape
    order = torch.tensor(AWQ_UNPACK_ORDER, device=packed.device)
    return codes.view(rows, out // 8, 8).index_select(2, order).reshape(rows, out)


def _layer_error(prefix: str, method: str, message: str) -> WeightsError:
    return WeightsError(f"{method} layer {prefix or '(unnamed)'}: {message}; the checkpoint is damaged or not {method}")


def _shapes(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items())


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, prefix: str = ""
) -> torch.Tensor:
    """An AWQ GEMM 4-bit layer as a dense float32 ``[out, in]`` weight (meta tensors: shape only)."""
    if qweight.dim() != 2 or scales.dim() != 2:
        raise _layer_error(prefix, "AWQ", f"shapes {_shapes(qweight=qweight, scales=scales)} are not matrices")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if (
        tuple(scales.shape) != (groups, out_features)
        or tuple(qzeros.shape) != (groups, qweight.shape[1])
        or groups == 0
        or in_features % groups
    ):
        shapes = _shapes(qweight=qweight, qzeros=qzeros, scales=scales)
        raise _layer_error(prefix, "AWQ", f"shapes {shapes} do not fit together")
    if qweight.is_meta:
        return torch.empty((out_features, in_features), device="meta")
    group_size = in_features // groups
    codes = unpack_awq(qweight)  # [in, out]
    zeros = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)
    weight = (codes - zeros).float() * scales.float().repeat_interleave(group_size, dim=0)
    return weight.t().contiguous()


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    zero_offset: int = 1,
    prefix: str = "",
) -> torch.Tensor:
    """A GPTQ layer as a dense float32 ``[out, in]`` weight (meta tensors: shape only).

    :param g_idx: ``[in]``, each input feature's group; None: ``i // group_size`` (-1: one group).
    :param zero_offset: added to each stored zero point: 1 for the v1 format, 0 for v2.
    """
    if qweight.dim() != 2 or scales.dim() != 2:
        raise _layer_error(prefix, "GPTQ", f"shapes {_shapes(qweight=qweight, scales=scales)} are not matrices")
    per_word = 32 // bits
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    groups = scales.shape[0]
    size = in_features if group_size == -1 else group_size
    if (
        tuple(scales.shape) != (groups, out_features)
        or tuple(qzeros.shape) != (groups, out_features // per_word)
        or out_features % per_word
        or (g_idx is not None and tuple(g_idx.shape) != (in_features,))
        # without g_idx the groups follow from the group size, and must be exactly as many
        or (g_idx is None and groups != -(-in_features // size))
    ):
        shapes = _shapes(qweight=qweight, qzeros=qzeros, scales=scales, **({} if g_idx is None else {"g_idx": g_idx}))
        raise _layer_error(prefix, "GPTQ", f"shapes {shapes} do not fit together at {bits} bits, group {group_size}")
    if qweight.is_meta:
        return torch.empty((out_features, in_features), device="meta")
    if g_idx is None:
        group_of = torch.arange(in_features, device=qweight.device) // size
    else:
        group_of = g_idx.long()
    if int(group_of.min()) < 0 or int(group_of.max()) >= groups:
        found = f"{int(group_of.min())}..{int(group_of.max())}"
        raise _layer_error(prefix, "GPTQ", f"input features map to groups {found}, but there are {groups} scales")
    codes = unpack_int32(qweight, bits, dim=0)  # [in, out]
    zeros = unpack_int32(qzeros, bits, dim=1) + zero_offset  # [groups, out]
    weight = (codes - zeros[group_of]).float() * scales.float()[group_of]
    return weight.t().contiguous()


# -- the checkpoint transform -----------------------------------------------------------------


def _optional_if_zero_gptq_bias(checkpoint: CheckpointFormat, part: str, tensor: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's exporters write a ``bias`` of zeros for every quantized layer, also in models
    whose layers have none: such a tensor is loaded where the model has a bias and dropped where
    it has not (as vLLM does), instead of being reported as unexpected. A non-zero bias the model
    has no place for still is. (On the meta device the values are unknown: every GPTQ bias is.)"""
    if checkpoint.method != "gptq" or part != "bias":
        return tensor
    if tensor.is_meta or not bool(tensor.any()):
        from vlm.nn.weights import mark_optional  # here: vlm.nn imports this package

        return mark_optional(tensor)
    return tensor


def dequantized_weights(
    weights: Iterable[tuple[str, torch.Tensor]], checkpoint: CheckpointFormat
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with each quantized layer's parts replaced by its dense ``{prefix}.weight``,
    yielded as soon as its parts have all come (they may be spread over shards); every other
    tensor passes through as it is.

    :raises WeightsError: a layer whose parts are not all there, or do not fit together.
    """
    parts = checkpoint.parts
    required = checkpoint.required_parts
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in parts:
            yield name, _optional_if_zero_gptq_bias(checkpoint, part, tensor)
            continue
        layer = pending.setdefault(prefix, {})
        layer[part] = tensor
        if len(layer) == len(parts):
            yield f"{prefix}.weight", checkpoint.dequantize(prefix, pending.pop(prefix))
    for prefix, layer in pending.items():
        if parts[0] not in layer:  # not a quantized layer: tensors that merely share a part's name
            for part, tensor in layer.items():
                yield f"{prefix}.{part}", tensor
            continue
        missing = [part for part in required if part not in layer]
        if missing:
            found = ", ".join(sorted(layer))
            raise WeightsError(
                f"{checkpoint.method.upper()} layer {prefix} has {found} but no {' or '.join(missing)}; "
                "the checkpoint is incomplete"
            )
        yield f"{prefix}.weight", checkpoint.dequantize(prefix, layer)  # GPTQ without g_idx


__all__ = [
    "AWQ_PACK_ORDER",
    "SUPPORTED",
    "CheckpointFormat",
    "checkpoint_quantization",
    "dequantize_awq",
    "dequantize_gptq",
    "dequantized_weights",
    "unpack_awq",
    "unpack_int32",
]
