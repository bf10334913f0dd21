"""Finding a model directory, streaming its checkpoint into a model, and :func:`load_model`.

safetensors first (single file or sharded through ``model.safetensors.index.json``), memory-mapped
and read one tensor at a time; ``.bin`` files only through ``torch.load(weights_only=True)``, which
never unpickles arbitrary objects. A progress bar appears for checkpoints that take a while.
AWQ and GPTQ checkpoints are dequantized as they stream (:mod:`vlm.quantization.formats`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

from vlm.errors import ConfigError, ModelNotFoundError, WeightsError, reason
from vlm.nn.linear import prepare_for_inference
from vlm.plugin.manager import build_model, check_model, get_registry
from vlm.quantization import QuantConfig, assign_quant_config, checkpoint_quantization, dequantized_weights
from vlm.rewrite import RewriterContext, patch_model

if TYPE_CHECKING:
    from vlm.config import ModelConfig
    from vlm.nn.weights import LoadReport
    from vlm.plugin.model_protocol import ModelProtocol

logger = logging.getLogger("vlm")

_PROGRESS_MIN_BYTES = 256 * 2**20


def resolve_model_path(model: str, allow_download: bool = False) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache.

    Nothing is downloaded unless ``allow_download`` is true.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {model!r} is a file; pass the model directory that holds config.json")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(model, local_files_only=not allow_download))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"model {model!r} is not a directory and not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); download it first (`hf download {model}`) "
                "or pass --allow-download"
            ) from None
        except Exception as exc:
            raise ModelNotFoundError(f"model {model!r} could not be fetched: {exc}") from None
    raise ModelNotFoundError(
        f"model {model!r} not found: no such directory ({path.resolve()}) and not a hub id (owner/name)"
    )


@dataclass
class CheckpointFile:
    path: Path
    format: str  # "safetensors" or "bin"


def checkpoint_files(model_dir: Path) -> list[CheckpointFile]:
    """The checkpoint's files, safetensors preferred; raises when there are none or shards are missing."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise WeightsError(f"{index} is not a valid shard index ({exc}); re-download it") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing)}; re-download them")
            return [CheckpointFile(model_dir / s, fmt) for s in shards]
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors:
        return [CheckpointFile(p, "safetensors") for p in safetensors]
    bins = sorted(p for p in model_dir.glob("*.bin") if p.name != "training_args.bin")
    if bins:
        return [CheckpointFile(p, "bin") for p in bins]
    sat = _sat_checkpoint(model_dir)
    if sat is not None:
        return [CheckpointFile(sat, "bin")]
    raise WeightsError(f"no *.safetensors or *.bin weights in {model_dir}; the checkpoint is incomplete")


def _sat_checkpoint(model_dir: Path) -> Path | None:
    """A SwissArmyTransformer checkpoint's state file: ``mp_rank_00_model_states.pt`` in the model
    directory or in the iteration directory its ``latest`` file names; ``None`` when there is none."""
    folders = [model_dir]
    latest = model_dir / "latest"
    if latest.is_file():
        folders.insert(0, model_dir / latest.read_text().strip())
    for folder in folders:
        state = folder / "mp_rank_00_model_states.pt"
        if state.is_file():
            if (folder / "mp_rank_01_model_states.pt").is_file():
                raise WeightsError(
                    f"{folder} holds a SAT checkpoint split over several model-parallel ranks; merge it into one "
                    "mp_rank_00_model_states.pt (model_parallel_size 1) first"
                )
            return state
    return None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_checkpoint(
    files: list[CheckpointFile], meta: bool = False, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, one at a time.

    :param meta: yield ``meta``-device tensors of the right shape and dtype without reading data
        (used by ``vlmrun check``; only safetensors headers are read).
    """
    total = sum(f.path.stat().st_size for f in files)
    bar = None
    if progress and not meta and total >= _PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", leave=False)
    try:
        for file in files:
            if file.format == "safetensors":
                yield from _iter_safetensors(file.path, meta, bar)
            else:
                yield from _iter_bin(file.path, meta, bar)
    finally:
        if bar is not None:
            bar.close()


def _iter_safetensors(path: Path, meta: bool, bar) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise WeightsError(f"{path} is truncated or not a safetensors file ({exc}); re-download it") from None
    with handle as f:
        for name in f.keys():
            if meta:
                piece = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
                yield name, torch.empty(piece.get_shape(), dtype=dtype, device="meta")
                continue
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:
                raise WeightsError(f"{path}: tensor {name!r} could not be read ({exc}); re-download the file") from None
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())
            yield name, tensor


def _iter_bin(path: Path, meta: bool, bar) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True, mmap=not meta)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # the legacy (pre-zip) torch.save format cannot be memory-mapped: read it whole
            state = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path} could not be loaded safely ({type(exc).__name__}: {_bin_error_reason(exc)}); "
            "only plain tensors are accepted from .bin files and nothing in it was run; "
            "convert it to safetensors"
        ) from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    if isinstance(state.get("module"), dict):  # SAT / DeepSpeed: the state dict under "module", beside counters
        state = state["module"]
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(
                f"{path}: entry {name!r} is not a tensor but a {type(tensor).__name__}; the file is not a state dict"
            )
        if bar is not None:
            bar.update(tensor.numel() * tensor.element_size())
        yield name, tensor


def _bin_error_reason(exc: Exception) -> str:
    """The line of torch.load's error that says what was refused (its first line advises
    ``weights_only=False``, which is exactly what must not be done with an untrusted file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else "unreadable"


def load_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer (never with remote code), or a one-line ConfigError."""
    from transformers import AutoTokenizer

    needs = "the model directory needs tokenizer files (tokenizer.json, or tokenizer_config.json with its vocabulary)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(f"no usable tokenizer in {model_dir} ({reason(exc)}); {needs}") from None
    # without any tokenizer file transformers builds an empty tokenizer of the config's class, which
    # turns every prompt into nothing
    if len(tokenizer) < 2:
        raise ConfigError(f"no tokenizer in {model_dir} (it has {len(tokenizer)} token(s)); {needs}")
    return tokenizer


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """``generation_config.json`` as a dict; empty when absent or not valid JSON (with a warning)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("ignoring %s: not valid JSON", path)
        return {}
    return config if isinstance(config, dict) else {}


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    plugin: str  # the plugin that built it
    report: LoadReport  # what load_weights matched, missed or could not place


def load_model(
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    plugin: str | None = None,
    *,
    model: torch.nn.Module | None = None,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    strict: bool = True,
    verify: Callable[[torch.nn.Module, LoadReport], None] | None = None,
    progress: bool = True,
    quantization: QuantConfig | None = None,
    requantize: bool = True,
    rewrite_cfg: Any = None,
) -> LoadedModel:
    """Build the model with the plugin that serves it, stream the checkpoint into ``load_weights``
    and prepare it for inference (packed CPU weights): the one way the engine, ``vlmrun check``
    and the conformance kit get a model. On the ``meta`` device only shapes are read.

    :param model: an already built model (the conformance kit builds it itself to check it).
    :param weights: ``(name, tensor)`` pairs instead of the checkpoint's files.
    :param strict: raise :class:`vlm.nn.weights.CheckpointMismatchError` unless every tensor and
        parameter is matched; ``vlmrun check`` lists the mismatches instead.
    :param verify: called with the model and the report after loading, before the weights are
        repacked (the conformance kit checks there that every parameter was written).
    :param quantization: quantize the language model's linear layers so (:mod:`vlm.quantization`):
        they are told before loading (a layer that cannot be quantized so fails before any weight
        is read), load full precision and quantize themselves when prepared for inference.
    :param requantize: for a pre-quantized checkpoint (AWQ, GPTQ, compressed-tensors: :mod:`vlm.quantization.formats`),
        which is dequantized while it loads: without ``quantization``, quantize its layers again on
        the fly with the matching scheme (default), or keep them dense in ``dtype`` (False).
    :param rewrite_cfg: the ``cfg`` rewriters see (:mod:`vlm.rewrite`; the engine passes its
        ``EngineConfig``, default ``model_config``). The model is built and loaded inside a
        ``RewriterContext`` for ``device.type`` and patched with that backend's module rewriters.
    :raises QuantizationError: the checkpoint is quantized in a way that is not read (before
        anything is built).
    """
    checkpoint_format = checkpoint_quantization(getattr(model_config, "hf_config", None))
    fallback = None
    if checkpoint_format is not None and quantization is None and requantize:
        quantization, fallback = checkpoint_format.requantization()
        logger.info(
            "%s checkpoint: dequantized while loading and quantized again on the fly (requantize=False keeps it %s)",
            checkpoint_format.describe(),
            str(dtype).removeprefix("torch."),
        )
    get_registry()  # plugins register their rewriters when they load: before the context is planned
    cfg = model_config if rewrite_cfg is None else rewrite_cfg
    with RewriterContext(cfg, backend=device.type):
        if model is None:
            model, plugin = build_model(model_config, dtype, device, plugin)
            check_model(model, plugin)
        assign_quant_config(model, quantization, fallback)
        meta = device.type == "meta"
        if weights is None:
            files = checkpoint_files(Path(model_config.path))
            weights = iter_checkpoint(files, meta=meta, progress=progress and os.isatty(2))
        if checkpoint_format is not None:
            weights = dequantized_weights(weights, checkpoint_format)
        report = cast("ModelProtocol", model).load_weights(weights)
        if strict and not report.ok:
            raise report.error(model_config.path)
        if verify is not None:
            verify(model, report)
        model.eval()
        if not meta:  # on meta only shapes are read: wrappers there would check nothing real
            # after loading (a wrapper renames its module's parameters), before packing (it may read them)
            model = patch_model(model, cfg, backend=device.type)
            prepare_for_inference(model)
    return LoadedModel(model, plugin or "", report)
