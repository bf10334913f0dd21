"""compressed-tensors checkpoints (``pack-quantized`` W4A16 / W8A16): read while loading, and written
by ``vlmrun quantize``.

compressed-tensors is the format vLLM, transformers and llm-compressor share for quantized
checkpoints. A weight-only layer ``{prefix}`` is stored as ``{prefix}.weight_packed`` (int32 words,
``32 / bits`` codes each), ``{prefix}.weight_scale`` (``[out, in / group]``, or ``[out, 1]`` per
channel), ``{prefix}.weight_shape`` (the dense ``[out, in]``) and, for asymmetric schemes,
``{prefix}.weight_zero_point``; config.json's ``quantization_config`` (``quant_method:
"compressed-tensors"``) names the scheme of each group of target modules. Every packing,
unpacking, scale and config detail here goes through the ``compressed-tensors`` library itself
(imported on first use), so what vlm writes is what vLLM and transformers read, and the other way
round.

Which layers ``vlmrun quantize`` quantizes: the 2-D weights of the language model's decoder blocks
(a ``layers.<n>.`` path component), not those of a vision tower (a path component starting with
``vision`` or ``visual``) — the layers ``vlmrun --quantize`` quantizes on the fly, decided from the
checkpoint's names alone so that any family's checkpoint, in any layout, can be written. The
config's ``ignore`` list holds the same rule as regular expressions, so that a reader that matches
modules by name (transformers, vLLM) expects exactly the layers that were packed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm.errors import ConfigError, WeightsError
from vlm.quantization.config import QuantizationError

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

logger = logging.getLogger("vlm")

METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
#: ``vlmrun quantize --scheme`` -> the library's preset scheme name
SCHEMES = {"w4a16": "W4A16", "w8a16": "W8A16"}
DEFAULT_GROUP_SIZE = 128

#: a decoder block's path component, and a vision module's (see the module docstring)
_DECODER_BLOCK = r"(.*\.)?layers\.\d+\."
_VISION_MODULE = r"(.*\.)?(vision|visual)[^.]*\."
#: the ``ignore`` entries that keep every other module dense for readers that match by name
IGNORE = ["lm_head", f"re:(?!{_DECODER_BLOCK})", f"re:{_VISION_MODULE}"]


def is_quantized_layer(name: str, tensor: torch.Tensor) -> bool:
    """Whether ``vlmrun quantize`` packs the checkpoint tensor ``name`` (see the module docstring)."""
    if not name.endswith(".weight") or tensor.dim() != 2 or not tensor.is_floating_point():
        return False
    module = name.removesuffix(".weight")
    return not any(re.match(pattern.removeprefix("re:"), module) for pattern in IGNORE[1:]) and module != "lm_head"


def _library() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise ConfigError(
            "compressed-tensors checkpoints need the compressed-tensors package: pip install compressed-tensors"
        ) from None
    return compressed_tensors


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightScheme:
    """The one weight scheme of a compressed-tensors checkpoint's quantized layers.

    :param group_size: input features per scale; -1: one scale per output channel.
    """

    bits: int
    group_size: int
    symmetric: bool

    @property
    def parts(self) -> tuple[str, ...]:
        base = ("weight_packed", "weight_scale", "weight_shape")
        return base if self.symmetric else (*base, "weight_zero_point")

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"compressed-tensors W{self.bits}A16 ({PACKED_FORMAT}, {kind}), {group}"

    def library_scheme(self) -> QuantizationScheme:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        strategy = "channel" if self.group_size == -1 else "group"
        args = QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy=strategy,
            group_size=None if self.group_size == -1 else self.group_size,
        )
        return QuantizationScheme(targets=["Linear"], weights=args)


def _value(setting: Any) -> str:
    """An enum setting of the library's config as its plain string (``"group"``, not ``QuantizationStrategy.GROUP``)."""
    return str(getattr(setting, "value", setting))


def _unsupported(what: str) -> QuantizationError:
    return QuantizationError(
        f"the checkpoint is compressed-tensors {what}, which vlm does not read; supported: "
        f"{PACKED_FORMAT} weight-only int4 / int8 (W4A16, W8A16) with group or channel scales"
    )


def read_scheme(config: Mapping[str, Any]) -> WeightScheme:
    """The weight scheme of a ``quantization_config`` with ``quant_method: "compressed-tensors"``.

    :raises QuantizationError: anything but weight-only ``pack-quantized`` int4 / int8, one scheme
        for every group (one line, naming what the checkpoint has).
    """
    _library()
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    try:
        parsed = QuantizationConfig.model_validate(dict(config))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise QuantizationError(
            f"the checkpoint's compressed-tensors quantization_config is not valid ({where}: {first['msg']}); "
            "the config.json is damaged"
        ) from None
    schemes: list[WeightScheme] = []
    for name, group in parsed.config_groups.items():
        weights: QuantizationArgs | None = group.weights
        fmt = group.format or parsed.format
        if fmt != PACKED_FORMAT:
            raise _unsupported(f"in the {fmt!r} format (config group {name!r})")
        if weights is None or _value(weights.type) != "int" or weights.num_bits not in (4, 8):
            what = (
                "without weight quantization" if weights is None else f"{_value(weights.type)} {weights.num_bits}-bit"
            )
            raise _unsupported(f"{what} (config group {name!r})")
        if group.input_activations is not None or group.output_activations is not None:
            raise _unsupported(f"with quantized activations (config group {name!r})")
        strategy = _value(weights.strategy)
        if strategy not in ("group", "channel"):
            raise _unsupported(f"with {strategy} scales (config group {name!r})")
        group_size = -1 if strategy == "channel" else int(weights.group_size or 0)
        schemes.append(WeightScheme(weights.num_bits, group_size, bool(weights.symmetric)))
    if not schemes:
        raise _unsupported("with no config_groups")
    if len(set(schemes)) > 1:
        raise _unsupported("with a different scheme per config group (" + "; ".join(map(str, schemes)) + ")")
    status = _value(parsed.quantization_status)
    if status != "compressed":
        raise _unsupported(f"with quantization_status {status!r} (not 'compressed')")
    return schemes[0]


def dequantize(scheme: WeightScheme, prefix: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense float32 ``[out, in]`` weight of the layer stored as ``tensors`` (meta: shape only)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    if packed.dim() != 2 or scale.dim() != 2 or packed.shape[0] != scale.shape[0]:
        shapes = f"weight_packed {list(packed.shape)}, weight_scale {list(scale.shape)}"
        raise WeightsError(
            f"compressed-tensors layer {prefix}: shapes {shapes} do not fit together; the checkpoint is damaged"
        )
    if packed.is_meta:
        per_row = scale.shape[1] * scheme.group_size if scheme.group_size != -1 else packed.shape[1] * 32 // scheme.bits
        return torch.empty((packed.shape[0], per_row), device="meta")
    shape = [int(v) for v in tensors["weight_shape"].tolist()]
    words = -(-shape[1] * scheme.bits // 32) if len(shape) == 2 else -1
    groups = 1 if scheme.group_size == -1 else -(-shape[1] // scheme.group_size) if len(shape) == 2 else -1
    if len(shape) != 2 or shape[0] != packed.shape[0] or packed.shape[1] != words or scale.shape[1] != groups:
        shapes = f"weight_shape {shape}, weight_packed {list(packed.shape)}, weight_scale {list(scale.shape)}"
        raise WeightsError(
            f"compressed-tensors layer {prefix}: {shapes} do not fit {scheme.describe()}; the checkpoint is damaged"
        )
    state = {name: tensor for name, tensor in tensors.items()}
    state["weight_scale"] = scale.float()  # (q - zero) * scale is exact in float32
    dense = PackedQuantizationCompressor.decompress(state, scheme.library_scheme())["weight"]
    return dense.float()


# -- writing ----------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_BYTES = 2 << 30


@dataclass
class QuantizeReport:
    layers: int
    bytes_before: int
    bytes_after: int
    seconds: float
    output: Path

    def summary(self, scheme: WeightScheme) -> str:
        mib = 1 << 20
        return (
            f"quantized {self.layers} linear layers to {scheme.describe()}: "
            f"{self.bytes_before / mib:.0f} MiB -> {self.bytes_after / mib:.0f} MiB in {self.seconds:.1f} s; "
            f"wrote {self.output}"
        )


def scheme_for(name: str, group_size: int = DEFAULT_GROUP_SIZE) -> WeightScheme:
    """``vlmrun quantize --scheme``'s scheme: the library's preset, with ``group_size`` for int4."""
    _library()
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = SCHEMES.get(name.lower())
    if preset is None:
        raise ConfigError(f"--scheme {name!r} is not one of {', '.join(SCHEMES)}")
    args = preset_name_to_scheme(preset, ["Linear"]).weights
    assert args is not None
    if _value(args.strategy) == "channel":
        return WeightScheme(args.num_bits, -1, bool(args.symmetric))
    if group_size <= 0 or group_size % 8:
        raise ConfigError(f"--group-size {group_size} is not a positive multiple of 8 (e.g. 32, 64 or 128)")
    return WeightScheme(args.num_bits, group_size, bool(args.symmetric))


def quantize_layer(weight: torch.Tensor, scheme: WeightScheme, name: str = "") -> dict[str, torch.Tensor]:
    """A dense ``[out, in]`` weight as its compressed-tensors parts (scales in the weight's dtype)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    library_scheme = scheme.library_scheme()
    args = library_scheme.weights
    assert args is not None
    out_features, in_features = weight.shape
    if scheme.group_size != -1 and in_features % scheme.group_size:
        fits = [str(size) for size in (32, 64, 128) if in_features % size == 0]
        hint = f"use --group-size {' or '.join(fits)}" if fits else "use --scheme w8a16"
        raise QuantizationError(
            f"{name or 'a layer'} has {in_features} input features, not a whole number of groups of "
            f"{scheme.group_size}; {hint}"
        )
    dense = weight.detach().float()
    grouped = dense.view(out_features, -1, in_features if scheme.group_size == -1 else scheme.group_size)
    scale, zero_point = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
    # the codes are computed from the scales as stored, so dequantizing gives what the packer meant
    scale = scale.to(weight.dtype)
    state = {"weight": dense, "weight_scale": scale.float(), "weight_zero_point": zero_point}
    packed = PackedQuantizationCompressor.compress(state, library_scheme)
    packed["weight_scale"] = scale
    return {part: packed[part].contiguous() for part in scheme.parts}


def quantized_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], scheme: WeightScheme, counter: list[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with every layer :func:`is_quantized_layer` picks replaced by its parts."""
    for name, tensor in tensors:
        if not is_quantized_layer(name, tensor):
            yield name, tensor
            continue
        prefix = name.removesuffix(".weight")
        for part, value in quantize_layer(tensor, scheme, prefix).items():
            yield f"{prefix}.{part}", value
        if counter is not None:
            counter[0] += 1


def quantize_checkpoint(model_dir: Path, output: Path, scheme: WeightScheme, progress: bool = True) -> QuantizeReport:
    """Write ``model_dir``'s checkpoint with its decoder layers quantized to ``scheme`` as a
    compressed-tensors checkpoint in ``output`` (every other file copied as it is).

    Written into a temporary sibling directory and renamed at the end, so that an interrupted run
    leaves nothing half-written under ``output``.

    :raises ConfigError: ``output`` is not empty, is ``model_dir``, or the model is already quantized.
    """
    from safetensors.torch import save_file

    from vlm.loader import checkpoint_files, iter_checkpoint

    _library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    started = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; pass the model directory")
    if output.resolve() == model_dir.resolve():
        raise ConfigError("the output directory is the model directory; write the quantized model elsewhere (-o DIR)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output} exists and is not empty; pass a new directory to -o (nothing was written)")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config"):
        method = (config.get("quantization_config") or config["text_config"]["quantization_config"]).get("quant_method")
        raise ConfigError(f"{model_dir} is already quantized ({method}); quantize the full-precision model instead")
    files = checkpoint_files(model_dir)
    bytes_before = sum(f.path.stat().st_size for f in files)

    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        counter = [0]
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        stream = quantized_tensors(iter_checkpoint(files, progress=progress), scheme, counter)
        for name, tensor in stream:
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > _SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.contiguous()
            size += nbytes
        if counter[0] == 0:
            raise ConfigError(
                f"{model_dir} has no decoder-layer weights to quantize (no 'layers.<n>.' tensors outside a vision tower)"
            )
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map: dict[str, str] = {}
        for file_name, shard in zip(names, shards, strict=True):
            save_file(shard, str(partial / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        del shards
        for item in model_dir.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES:
                shutil.copy2(item, partial / item.name)
        quantization = QuantizationConfig(
            config_groups={"group_0": scheme.library_scheme()},
            format=PACKED_FORMAT,
            quantization_status="compressed",
            ignore=list(IGNORE),
        )
        ModelCompressor(quantization_config=quantization).update_config(str(partial))
        if output.exists():
            output.rmdir()  # empty, checked above
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    bytes_after = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    return QuantizeReport(counter[0], bytes_before, bytes_after, time.perf_counter() - started, output)


__all__ = [
    "IGNORE",
    "METHOD",
    "SCHEMES",
    "QuantizeReport",
    "WeightScheme",
    "dequantize",
    "is_quantized_layer",
    "quantize_checkpoint",
    "quantize_layer",
    "quantized_tensors",
    "read_scheme",
    "scheme_for",
]
