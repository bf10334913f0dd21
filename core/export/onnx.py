"""A vision-language model's vision part as an ONNX graph, checked against torch with onnxruntime.

The part is what the model's ``embed_images`` computes for one image: the vision tower and the
projector, pixels in, the language model's image features out. The model is loaded as the engine
loads it (its plugin's ``build_model`` and ``load_weights``), in float32 on CPU, with the
``onnx`` backend's rewrites (:mod:`vlm.export.rewrites`) applied, and traced with
``torch.onnx.export(..., dynamo=True)`` (``torch.export``).

What the graph takes:

- ``pixel_values``: an image's pixels as the plugin's preprocessor makes them (``[tiles, 3, H,
  W]`` for InternVL, ``[images, 3, H, W]`` for LLaVA, ``[patches, C * T * P * P]`` for Qwen2-VL),
  with a dynamic first axis: several images' pixels concatenated give all their features, in order.
- one int64 input ``[images, k]`` per name in the model's ``vision_export_inputs`` (e.g.
  Qwen2-VL's ``image_grid_thw``): the ``ImageInput.extra`` entries the tower reads, one row per
  image. Every other ``extra`` entry the model might read is a constant of the graph (its value
  is written in the graph's metadata).

A traced graph is only trusted once it has been run: the export runs it with onnxruntime on two
sample pictures of different sizes and on both at once, against the torch model's ordinary
``embed_images``. When the graph does not take other sizes than the one it was traced with (a
family whose output depends on a constant, or a loop the tracer unrolled), it is exported again
with every shape fixed, and its metadata says so (``vlm.fixed_shapes``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.errors import InputError, VlmError, reason
from vlm.export.rewrites import onnx_rewrites, translation_table
from vlm.inputs import ImageInput

#: the check's tolerance: |onnx - torch| <= ATOL + RTOL * |torch| for every feature
ATOL = 1e-4
RTOL = 1e-4

#: the sample pictures (width, height): two sizes, so that tiles, patches and grids differ
SAMPLE_SIZES = ((112, 84), (56, 56))

OUTPUT_NAME = "image_features"

logger_of_vlm = logging.getLogger("vlm")


class ExportError(VlmError):
    """The model's vision part cannot be exported, or the exported graph is not right."""


@dataclass
class GraphValue:
    """One input or output of the written graph."""

    name: str
    dtype: str
    shape: list[int | str]

    def describe(self) -> str:
        return f"{self.name} {self.dtype} [{', '.join(str(d) for d in self.shape)}]"


@dataclass
class ExportResult:
    path: Path
    plugin: str
    inputs: list[GraphValue]
    outputs: list[GraphValue]
    dynamic: bool  # the first axis of every input is dynamic (checked at other sizes)
    checks: list[tuple[str, float]] = field(default_factory=list)  # (what ran, max abs difference)
    constants: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        size = sum(p.stat().st_size for p in self.files())
        lines = [f"wrote {self.path} ({size / 2**20:.1f} MiB, plugin {self.plugin})"]
        lines += [f"  input   {value.describe()}" for value in self.inputs]
        lines += [f"  output  {value.describe()}" for value in self.outputs]
        if not self.dynamic:
            lines.append("  shapes are fixed to the sample picture's: the graph did not take other sizes")
        if self.constants:
            lines.append(f"  constants of the graph: {json.dumps(self.constants)}")
        worst = max(diff for _, diff in self.checks)
        ran = ", ".join(what for what, _ in self.checks)
        lines.append(f"  onnxruntime equals torch within {worst:.1e} (max abs) on: {ran}")
        return "\n".join(lines)

    def files(self) -> list[Path]:
        data = self.path.with_name(self.path.name + ".data")
        return [self.path, data] if data.exists() else [self.path]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class VisionPart(nn.Module):
    """``embed_images`` of one image whose pixels and extras are graph inputs.

    :param constants: the ``ImageInput.extra`` entries that are not inputs (the sample's values).
    :param input_names: the ``extra`` entries given as tensors after the pixels, in order.
    """

    def __init__(self, model: nn.Module, constants: dict[str, Any], input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.constants = constants
        self.input_names = tuple(input_names)

    def forward(self, pixel_values: torch.Tensor, *extra_inputs: torch.Tensor) -> torch.Tensor:
        extra = {**self.constants, **dict(zip(self.input_names, extra_inputs))}
        image = ImageInput(pixel_values=pixel_values, num_tokens=0, key="vlmrun-export", extra=extra)
        features = self.model.embed_images([image])  # type: ignore[operator]
        return torch.cat(list(features))


def graph_inputs(images: Sequence[ImageInput], input_names: Sequence[str]) -> list[torch.Tensor]:
    """The graph's inputs for ``images``: their pixels concatenated, then one int64 ``[images, k]``
    tensor per extra entry named in ``input_names``."""
    tensors = [torch.cat([image.pixel_values for image in images])]
    for name in input_names:
        tensors.append(
            torch.cat([torch.as_tensor(image.extra[name], dtype=torch.int64).reshape(1, -1) for image in images])
        )
    return tensors


def export_vision_onnx(
    model: str,
    output: str | Path,
    plugin: str | None = None,
    allow_download: bool = False,
    log: Callable[[str], None] = _stderr,
) -> ExportResult:
    """Export the vision part of the model in ``model`` (a directory or a cached hub id) to ``output``.

    The file is written to a temporary name in the same directory and renamed once the graph
    has been checked, so ``output`` is never left half written.

    :raises InputError: the model has no vision part.
    :raises ExportError: the part cannot be traced, or the graph does not equal the torch model.
    """
    from vlm.config import load_model_config
    from vlm.loader import load_model, load_tokenizer, resolve_model_path
    from vlm.plugin.manager import build_preprocessor

    output = Path(output)
    if output.is_dir():
        raise InputError(f"-o {output} is a directory; name the .onnx file to write")
    if not output.parent.is_dir():
        raise InputError(f"-o {output}: directory {output.parent} does not exist; create it first")
    model_dir = resolve_model_path(model, allow_download)
    config = load_model_config(model_dir)
    architecture = ", ".join(config.architectures) or str(config.model_type)
    if not config.is_multimodal:
        raise InputError(
            f"{model_dir} is a text-only model ({architecture}): it has no vision tower to export; "
            "pass a vision-language model"
        )

    log(f"loading {model_dir} (float32, CPU)")
    with onnx_rewrites():
        loaded = load_model(config, torch.float32, torch.device("cpu"), plugin, requantize=False)
    vlm_model = loaded.model
    if not callable(getattr(vlm_model, "embed_images", None)):
        raise InputError(
            f"plugin {loaded.plugin!r} built {type(vlm_model).__name__} for {model_dir}, which has no "
            "embed_images: it runs the model as text only, so there is no vision part to export"
        )
    preprocessor = build_preprocessor(config, load_tokenizer(model_dir), loaded.plugin)
    samples = [preprocessor.preprocess_image(_sample_picture(size, seed)) for seed, size in enumerate(SAMPLE_SIZES)]
    input_names = tuple(getattr(vlm_model, "vision_export_inputs", ()))
    missing = [name for name in input_names if name not in samples[0].extra]
    if missing:
        raise ExportError(
            f"{type(vlm_model).__name__}.vision_export_inputs names {missing}, which its preprocessor does not "
            "put in ImageInput.extra; report it to the plugin's authors"
        )
    # with fixed shapes the other extra entries are the sample's values (the graph's metadata names
    # them); a dynamic graph is checked on pictures whose entries differ, so it does not read them
    constants = {name: value for name, value in samples[0].extra.items() if name not in input_names}
    part = VisionPart(vlm_model, constants, input_names).eval()
    names = ["pixel_values", *input_names]
    checks = [("picture 1", samples[:1]), ("picture 2", samples[1:]), ("both at once", samples)]

    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        draft = workdir / output.name
        meta: dict[str, Any] = dict(model=str(model_dir), architecture=architecture, plugin=loaded.plugin)
        for dynamic in (True, False):
            meta["constants"] = {} if dynamic else constants
            example = graph_inputs(_example_images(vlm_model, samples, dynamic), input_names)
            try:
                _export(part, example, names, dynamic, draft, meta, architecture, log)
            except ExportError as exc:
                if not dynamic:
                    raise
                log(f"it does not trace with a dynamic first axis ({exc.__cause__}); exporting it with fixed shapes")
                continue
            log(f"checking {draft.name} with onnxruntime against torch")
            results, failure = _check(draft, vlm_model, checks if dynamic else checks[:1], input_names)
            if failure is None:
                break
            if not dynamic:  # wrong for the very inputs it was traced with
                raise ExportError(
                    f"the exported graph of {architecture}'s vision part does not equal the torch model: {failure}; "
                    "report it with the model's config.json"
                )
            log(f"the graph does not take other sizes ({failure}); exporting it again with fixed shapes")
        inputs, outputs = _graph_values(draft)
        for path in sorted(workdir.iterdir()):
            os.replace(path, output.parent / path.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ExportResult(output, loaded.plugin, inputs, outputs, dynamic, results, _jsonable(meta["constants"]))


def _sample_picture(size: tuple[int, int], seed: int) -> Any:
    """A picture of random colours (a tower's numbers are exercised better than by a flat one)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _example_images(model: nn.Module, samples: list[ImageInput], dynamic: bool) -> list[ImageInput]:
    """The images to trace with: for a dynamic graph both samples at once where the model takes
    them (a first axis of 1 would be traced as the constant 1), else the first."""
    if dynamic:
        try:
            with torch.no_grad():
                model.embed_images(samples)  # type: ignore[operator]
            return samples
        except Exception:
            pass
    return samples[:1]


def _export(
    part: VisionPart,
    example: list[torch.Tensor],
    names: list[str],
    dynamic: bool,
    path: Path,
    meta: dict[str, Any],
    architecture: str,
    log: Callable[[str], None],
) -> None:
    """Trace ``part`` and write the graph (with its metadata) to ``path``."""
    shapes = "the first axis of every input dynamic" if dynamic else "fixed shapes"
    log(f"tracing the vision part with torch.export ({shapes})")
    start = time.monotonic()
    # VisionPart.forward(pixel_values, *extra_inputs): the extras are one tuple to torch.export
    first_axis = {0: torch.export.Dim.AUTO}
    extras = (tuple(first_axis for _ in example[1:]),) if len(example) > 1 else ()
    dynamic_shapes = (first_axis, *extras) if dynamic else None
    # torch.onnx warns about every torchvision op it does not register; torch.export and the shape
    # solver log what they cannot trace, graph dumps included, before raising it (reported below,
    # in one line)
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    # torch.export also prints the partial graph of a failed trace on stderr: kept for -v
    printed = io.StringIO()
    try:
        with torch.no_grad(), onnx_rewrites(), warnings.catch_warnings(), contextlib.redirect_stderr(printed):
            warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecations
            program = torch.onnx.export(
                part,
                tuple(example),
                dynamo=True,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                verbose=False,
            )
    except Exception as exc:
        failure = _export_failure(exc)
        raise ExportError(
            f"cannot export {architecture}'s vision part to ONNX: {failure}; its plugin's embed_images must "
            "be traceable by torch.export (no Python branches or loops on tensor values: see vlm.export.onnx)"
        ) from ExportError(failure)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        if printed.getvalue().strip():
            logger_of_vlm.info("the exporter printed:\n%s", printed.getvalue())
    assert program is not None  # dynamo=True always returns the program
    graph = program.model.graph
    if dynamic:
        _name_dynamic_axes(graph)
    props = {
        "vlm.part": "vision",
        "vlm.model": str(meta["model"]),
        "vlm.architecture": str(meta["architecture"]),
        "vlm.plugin": str(meta["plugin"]),
        "vlm.inputs": ", ".join(names),
        "vlm.fixed_shapes": "false" if dynamic else "true",
        "vlm.constants": json.dumps(_jsonable(meta["constants"])),
    }
    program.model.metadata_props.update(props)
    program.save(str(path))
    log(f"traced and written in {time.monotonic() - start:.1f} s")


def _name_dynamic_axes(graph: Any) -> None:
    """Name the tracer's symbols (``s51``) after the inputs whose first axis they are."""
    import onnx_ir as ir

    renames: dict[str, str] = {}
    for value in graph.inputs:
        dims = list(value.shape)
        if dims and isinstance(dims[0], ir.SymbolicDim) and dims[0].value is not None:
            renames[dims[0].value] = f"{value.name}_dim0"
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(pattern.sub(lambda m: renames[m.group(1)], d.value))
            if isinstance(d, ir.SymbolicDim) and d.value is not None
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def _export_failure(exc: BaseException) -> str:
    """The cause of a failed export in one line, with the line of model code that raised it."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause)
    where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(cause).__name__)
    first = " ".join(f"{type(cause).__name__}: {first}".split())[:300]
    if where:
        file, line, function = where[-1]
        return f"{first} (at {Path(file).name}:{line} in {function})"
    return first


def _check(
    path: Path,
    model: nn.Module,
    checks: Sequence[tuple[str, Sequence[ImageInput]]],
    input_names: Sequence[str],
) -> tuple[list[tuple[str, float]], str | None]:
    """Run the graph on each check's images and compare with the model's ``embed_images``.

    :return: the checks that passed (with their max abs difference), and the first failure (None
        when all passed). A check after the first whose images the torch model itself does not
        take (several pictures at once) is skipped.
    """
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a graph that fails on a size is reported below, in one line
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    passed: list[tuple[str, float]] = []
    for index, (what, images) in enumerate(checks):
        try:
            with torch.no_grad():
                expected = torch.cat(list(model.embed_images(list(images)))).numpy()  # type: ignore[operator]
        except Exception as exc:
            if index == 0:  # one picture, as the engine passes it: the model itself is broken
                raise ExportError(f"the torch model fails on a sample picture: {reason(exc)}") from exc
            continue
        feeds = {name: tensor.numpy() for name, tensor in zip(names, graph_inputs(images, input_names))}
        shapes = " and ".join(f"{name} {list(array.shape)}" for name, array in feeds.items())
        try:
            (got,) = session.run([OUTPUT_NAME], feeds)
        except Exception as exc:
            return passed, f"onnxruntime failed on {what} ({shapes}): {reason(exc, 200)}"
        if got.shape != expected.shape:
            return passed, f"{what} ({shapes}) gave {list(got.shape)} features, torch {list(expected.shape)}"
        diff = np.abs(got - expected)
        if not bool(np.all(diff <= ATOL + RTOL * np.abs(expected))):
            return passed, f"{what} ({shapes}) differs from torch by up to {float(diff.max()):.2e}"
        passed.append((f"{what} ({shapes})", float(diff.max())))
    return passed, None


def _graph_values(path: Path) -> tuple[list[GraphValue], list[GraphValue]]:
    """The written graph's inputs and outputs (names, element types, shapes with symbolic axes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: Any) -> GraphValue:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims: list[int | str] = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
        return GraphValue(value.name, dtype, dims)

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """``extra`` values as JSON can hold them (tuples as lists; anything else as its repr)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        try:
            out[name] = json.loads(json.dumps(value))
        except TypeError:
            out[name] = repr(value)
    return out


__all__ = [
    "ATOL",
    "RTOL",
    "ExportError",
    "ExportResult",
    "GraphValue",
    "VisionPart",
    "export_vision_onnx",
    "graph_inputs",
]
