"""``vlmrun export --part vision --format onnx``: each first-party vision tower, run by onnxruntime,
equals the torch tower the engine runs (within 1e-4), at more than one input size where the graph
claims a dynamic axis; and the errors.

The torch side is the model as the engine loads it (``vlm.loader.load_model``: packed CPU weights,
rotary tables), on pictures the exporter never saw, so the graph is checked against the engine's
own tower and not against the exporter's copy.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install onnxscript)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlm.cli.main import main  # noqa: E402

# (width, height) of the test's own pictures: not the exporter's samples
PICTURES = ((140, 70), (42, 84))


def tiny_checkpoint(family: str, path: Path) -> Path:
    if family == "internvl":
        from vlm_plugin_internvl.testing import write_tiny_internvl

        return write_tiny_internvl(path)
    if family.startswith("llava"):
        from vlm_plugin_llava.testing import write_tiny_llava

        variant = {"llava-clip": "llava-clip-llama", "llava-siglip": "llava-siglip-qwen2"}[family]
        return write_tiny_llava(path, variant)
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    return write_tiny_qwen2_vl(path, {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl"}[family])


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(100 + seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class TorchTower:
    """The model as the engine loads it, and its preprocessor."""

    def __init__(self, model_dir: Path):
        from vlm.config import load_model_config
        from vlm.loader import load_model, load_tokenizer
        from vlm.plugin.manager import build_preprocessor

        config = load_model_config(model_dir)
        self.model, plugin, _ = load_model(config, torch.float32, torch.device("cpu"), progress=False)
        self.preprocessor = build_preprocessor(config, load_tokenizer(model_dir), plugin)

    def features(self, images) -> np.ndarray:
        with torch.no_grad():
            return torch.cat(self.model.embed_images(images)).numpy()


def onnx_feeds(session, images, extra_names) -> dict[str, np.ndarray]:
    """The graph's inputs for ``images``: pixels concatenated, each named extra one int64 row per image."""
    feeds = {"pixel_values": torch.cat([image.pixel_values for image in images]).numpy()}
    for name in extra_names:
        feeds[name] = np.array([list(image.extra[name]) for image in images], dtype=np.int64)
    assert [i.name for i in session.get_inputs()] == list(feeds)
    return feeds


def export(model_dir: Path, out: Path, capsys, *extra: str) -> str:
    code = main(["export", "--model", str(model_dir), "--part", "vision", "--format", "onnx", "-o", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture
def plugin_file_isolation(monkeypatch):
    """A ``--plugin-file`` plugin stays registered in the process: forget it after the test."""
    from vlm.plugin.manager import PLUGIN_FILES_ENV, reset_registry

    monkeypatch.setenv(PLUGIN_FILES_ENV, "")  # so that monkeypatch restores what add_plugin_file sets
    monkeypatch.delenv(PLUGIN_FILES_ENV)
    reset_registry()
    yield
    monkeypatch.delenv(PLUGIN_FILES_ENV, raising=False)
    reset_registry()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-models")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tiny_checkpoint(family, root / family)
        return made[family]

    return get


FAMILIES = {
    # family: (graph inputs after pixel_values, the first axis of pixel_values)
    "internvl": ((), "tiles"),
    "llava-clip": ((), "images"),
    "llava-siglip": ((), "images"),
    "qwen2-vl": (("image_grid_thw",), "patches"),
    "qwen2.5-vl": (("image_grid_thw",), "patches"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_tower_equals_torch(family, checkpoints, tmp_path, capsys):
    model_dir = checkpoints(family)
    out = tmp_path / "tower.onnx"
    printed = export(model_dir, out, capsys)
    assert f"wrote {out}" in printed
    assert "input   pixel_values float32 [pixel_values_dim0," in printed
    assert "output  image_features float32" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx"]  # no temporary left behind

    proto = onnx.load(str(out))
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    extra_names, _ = FAMILIES[family]
    assert meta["vlm.part"] == "vision"
    assert meta["vlm.fixed_shapes"] == "false"
    assert meta["vlm.inputs"] == ", ".join(["pixel_values", *extra_names])
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "pixel_values_dim0"

    tower = TorchTower(model_dir)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = [tower.preprocessor.preprocess_image(picture(size, seed)) for seed, size in enumerate(PICTURES)]
    first_axes = set()
    for batch in ([images[0]], [images[1]], images):  # one picture, another size, both at once
        feeds = onnx_feeds(session, batch, extra_names)
        (got,) = session.run(["image_features"], feeds)
        expected = tower.features(batch)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, (family, [f.shape for f in feeds.values()])
        first_axes.add(feeds["pixel_values"].shape[0])
    assert len(first_axes) >= 2  # the dynamic axis really took other sizes


def test_a_tower_that_depends_on_a_constant_is_exported_with_fixed_shapes(tmp_path, capsys):
    """LLaVA-NeXT packs its tiles by the picture's original size, which is not a graph input: the
    graph is traced for the sample's shapes, says so, and is still right for them."""
    from vlm_plugin_llava.testing import write_tiny_llava

    model_dir = write_tiny_llava(tmp_path / "next", "llava-next-clip-mistral")
    out = tmp_path / "next.onnx"
    printed = export(model_dir, out, capsys)
    assert "shapes are fixed to the sample picture's" in printed
    proto = onnx.load(str(out))
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    assert meta["vlm.fixed_shapes"] == "true"
    assert '"original_size": [84, 112]' in meta["vlm.constants"]

    tower = TorchTower(model_dir)
    image = tower.preprocessor.preprocess_image(picture((112, 84), 0))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["image_features"], {"pixel_values": image.pixel_values.numpy()})
    assert np.abs(got - tower.features([image])).max() <= 1e-4


@pytest.mark.parametrize("variant", ["cogvlm2", "cogvlm"])
def test_cogvlm_tower_is_exported_for_its_one_picture_size(variant, tmp_path, capsys):
    """CogVLM resizes every picture to one square and takes one picture per prompt: the graph is
    traced for that shape (fixed, as the exporter says) and equals torch for pictures of any size
    within 1e-4 of the features' magnitude."""
    from vlm_plugin_cogvlm.testing import write_tiny_cogvlm

    model_dir = write_tiny_cogvlm(tmp_path / variant, variant)
    out = tmp_path / "tower.onnx"
    printed = export(model_dir, out, capsys)
    assert "shapes are fixed to the sample picture's" in printed
    meta = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert meta["vlm.fixed_shapes"] == "true"

    tower = TorchTower(model_dir)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for seed, size in enumerate(PICTURES):
        image = tower.preprocessor.preprocess_image(picture(size, seed))
        (got,) = session.run(["image_features"], {"pixel_values": image.pixel_values.numpy()})
        expected = tower.features([image])
        assert got.shape == expected.shape
        # 1e-4 relative to the features' magnitude, the engine parity rule: CogVLM's projector ends
        # in a GLU whose outputs reach ~3 here (max error seen: 1.1e-4 absolute)
        tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
        assert np.abs(got - expected).max() <= tolerance, (variant, np.abs(got - expected).max())


def test_text_only_model_is_refused(tiny_qwen2, tmp_path, capsys):
    out = tmp_path / "tower.onnx"
    assert main(["export", "--model", tiny_qwen2, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "text-only model" in err and "no vision tower to export" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_part_is_refused(tiny_qwen2, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["export", "--model", tiny_qwen2, "--part", "text", "-o", str(tmp_path / "x.onnx")])
    assert exited.value.code == 2
    assert "invalid choice: 'text'" in capsys.readouterr().err


UNEXPORTABLE = '''
"""A LLaVA whose embed_images branches on the pixels' values: no graph can hold that."""
from vlm.plugin import Claim, hookimpl

vlm_api_version = ">=1.0,<2"


@hookimpl
def match(hf_config):
    if "LlavaForConditionalGeneration" in (getattr(hf_config, "architectures", None) or []):
        return Claim(priority=10, reason="test")
    return None


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_llava.preprocess import LlavaPreprocessor

    return LlavaPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_llava.model import LlavaForConditionalGeneration

    class Unexportable(LlavaForConditionalGeneration):
        def embed_images(self, images):
            if float(images[0].pixel_values.mean()) > 10:  # data-dependent Python control flow
                return []
            return super().embed_images(images)

    return Unexportable(hf_config, model_config, dtype=dtype, device=device)
'''


def test_a_tower_that_cannot_be_traced_gives_one_line_naming_why(checkpoints, tmp_path, capsys, plugin_file_isolation):
    plugin = tmp_path / "vlmtest_unexportable.py"
    plugin.write_text(textwrap.dedent(UNEXPORTABLE))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["export", "--model", str(checkpoints("llava-clip")), "-o", str(out_dir / "tower.onnx")]
    assert main([*argv, "--plugin-file", str(plugin), "--plugin", "vlmtest_unexportable"]) == 1
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "cannot export LlavaForConditionalGeneration's vision part to ONNX" in error[0]
    assert "vlmtest_unexportable.py" in error[0] and "embed_images" in error[0]  # where it failed
    assert list(out_dir.iterdir()) == []  # nothing half written


def test_output_directory_must_exist(checkpoints, tmp_path, capsys):
    out = tmp_path / "missing" / "tower.onnx"
    assert main(["export", "--model", str(checkpoints("llava-clip")), "-o", str(out)]) == 1
    assert "does not exist; create it first" in capsys.readouterr().err


CUSTOM_OP = '''
"""A LLaVA whose projector output goes through a custom torch op that torch's exporter cannot
translate, shipped with its ONNX translation as a symbolic rewriter (registered at import)."""
import torch

from vlm.plugin import Claim, hookimpl
from vlm.rewrite import SYMBOLIC_REWRITER

vlm_api_version = ">=1.0,<2"


@torch.library.custom_op("vlmtest::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.tanh(x)


@scaled_tanh.register_fake
def _(x):
    return torch.empty_like(x)


@SYMBOLIC_REWRITER.register_symbolic("vlmtest::scaled_tanh", backend="onnx")
def scaled_tanh_onnx(x):
    from onnxscript import opset18 as op

    return op.Mul(op.Tanh(x), op.CastLike(op.Constant(value_float=3.0), x))


@hookimpl
def match(hf_config):
    if "LlavaForConditionalGeneration" in (getattr(hf_config, "architectures", None) or []):
        return Claim(priority=10, reason="test")
    return None


@hookimpl
def build_preprocessor(hf_config, model_path, tokenizer):
    from vlm_plugin_llava.preprocess import LlavaPreprocessor

    return LlavaPreprocessor(tokenizer, hf_config, model_path)


@hookimpl
def build_model(hf_config, model_config, dtype, device):
    from vlm_plugin_llava.model import LlavaForConditionalGeneration

    class WithCustomOp(LlavaForConditionalGeneration):
        def embed_images(self, images):
            return [scaled_tanh(features) for features in super().embed_images(images)]

    return WithCustomOp(hf_config, model_config, dtype=dtype, device=device)
'''


def test_an_op_the_exporter_cannot_translate_exports_through_a_symbolic_rewriter(
    checkpoints, tmp_path, capsys, monkeypatch, plugin_file_isolation
):
    from vlm.plugin.manager import PLUGIN_FILES_ENV, reset_registry
    from vlm.rewrite import SYMBOLIC_REWRITER

    plugin = tmp_path / "vlmtest_custom_op.py"
    plugin.write_text(textwrap.dedent(CUSTOM_OP))
    model_dir = checkpoints("llava-clip")
    out = tmp_path / "tower.onnx"
    try:
        export(model_dir, out, capsys, "--plugin-file", str(plugin), "--plugin", "vlmtest_custom_op")
    finally:
        SYMBOLIC_REWRITER.remove("vlmtest::scaled_tanh", backend="onnx")
        monkeypatch.delenv(PLUGIN_FILES_ENV)  # the torch side below is the plain LLaVA
        reset_registry()
    proto = onnx.load(str(out))
    assert "Tanh" in {node.op_type for node in proto.graph.node}  # the translation, not a custom-op node

    tower = TorchTower(model_dir)  # the plain LLaVA: the custom op is 3 * tanh of its features
    images = [tower.preprocessor.preprocess_image(picture(size, seed)) for seed, size in enumerate(PICTURES)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["image_features"], onnx_feeds(session, images, ()))
    assert np.abs(got - 3.0 * np.tanh(tower.features(images))).max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen2_vl_traceable_tower_equals_its_tower_on_mixed_grids(family, checkpoints):
    """The path the export traces (grids as a tensor, masks instead of sequence bounds and window
    reordering) equals the engine's, also for multi-frame grids and partial windows no picture
    of the export test has."""
    tower = TorchTower(checkpoints(family)).model.visual
    s = tower.settings
    grids = [(1, 4, 6), (2, 4, 4), (1, 10, 6)]
    patches = torch.randn(sum(t * h * w for t, h, w in grids), s.in_channels * s.temporal_patch_size * s.patch_size**2)
    with torch.no_grad():
        expected = tower(patches, grids)
        got = tower.forward_traceable(patches, torch.tensor(grids))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4
