"""compressed-tensors checkpoints (``vlm.quantization.compressed``): ``vlmrun quantize`` writes
them through the compressed-tensors library; vlm and transformers read them back alike.

The round-trip tests unpack with this file's own word-by-word reader, written from the format's
published layout (``pack_to_int32``: ``32 / bits`` codes per int32 word along the input features,
the first in the lowest bits, each stored as ``q + 2**(bits - 1)``; ``w = q * scale`` per group),
independent of the library code under test.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vlm
from vlm.cli import quantize as quantize_cli
from vlm.cli.main import main
from vlm.engine import llm_engine
from vlm.errors import ConfigError
from vlm.loader import load_model
from vlm.nn import linear
from vlm.quantization import QuantizationError, checkpoint_quantization, compressed
from vlm.testing.logits import generate_with_logits

pytest.importorskip("compressed_tensors")

PROMPT = "The quick brown fox jumps over the lazy dog"


# -- the layout, from the specification --------------------------------------------------------


def unpack_reference(packed: torch.Tensor, bits: int, in_features: int) -> np.ndarray:
    """Signed codes ``[out, in]`` of int32 ``[out, words]``, bit by bit."""
    words = packed.numpy().astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((words.shape[0], in_features), dtype=np.int64)
    for row in range(words.shape[0]):
        bitstream = 0
        for index, word in enumerate(words[row]):
            bitstream |= int(word) << (32 * index)
        for column in range(in_features):
            out[row, column] = ((bitstream >> (bits * column)) & ((1 << bits) - 1)) - (1 << (bits - 1))
    return out


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 32), (8, 128)])
def test_layer_round_trip_follows_the_published_layout(bits, group_size):
    torch.manual_seed(bits + group_size)
    weight = torch.randn(24, 256) * torch.rand(24, 1)
    scheme = compressed.WeightScheme(bits, group_size, symmetric=True)
    parts = compressed.quantize_layer(weight, scheme)
    assert set(parts) == {"weight_packed", "weight_scale", "weight_shape"}
    assert parts["weight_packed"].dtype == torch.int32 and parts["weight_packed"].shape == (24, 256 * bits // 32)
    assert parts["weight_scale"].shape == (24, 256 // group_size) and parts["weight_shape"].tolist() == [24, 256]
    codes = unpack_reference(parts["weight_packed"], bits, 256)
    assert codes.min() >= -(1 << (bits - 1)) and codes.max() <= (1 << (bits - 1)) - 1
    scale = parts["weight_scale"].float().repeat_interleave(group_size, dim=1)
    expected = torch.from_numpy(codes).float() * scale
    got = compressed.dequantize(scheme, "layer", parts)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - weight).abs().le(scale / 2 + 1e-6).all()  # every weight within half a step
    meta = {name: torch.empty_like(t, device="meta") for name, t in parts.items()}
    assert compressed.dequantize(scheme, "layer", meta).shape == (24, 256)


def test_layer_scales_keep_the_weights_dtype():
    parts = compressed.quantize_layer(torch.randn(16, 64, dtype=torch.bfloat16), compressed.WeightScheme(4, 32, True))
    assert parts["weight_scale"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name,quantized",
    [
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.language_model.layers.11.mlp.down_proj.weight", True),
        ("language_model.model.layers.3.attention.wqkv.weight", True),
        ("model.layers.0.self_attn.q_proj.bias", False),
        ("model.layers.0.input_layernorm.weight", False),  # 1-D
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.visual.blocks.0.attn.qkv.weight", False),
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", False),
        ("model.vision_model.encoder.layers.1.self_attn.k_proj.weight", False),
        ("multi_modal_projector.linear_1.weight", False),
        ("mlp1.1.weight", False),
    ],
)
def test_which_layers_are_quantized(name, quantized):
    shape = (8,) if "layernorm" in name or name.endswith("bias") else (8, 8)
    assert compressed.is_quantized_layer(name, torch.zeros(shape)) is quantized


def _config(**weights) -> dict:
    args = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128) | weights
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}},
    }


class _Config:
    def __init__(self, quantization_config):
        self.quantization_config = quantization_config


def test_a_written_config_reads_back():
    found = checkpoint_quantization(_Config(_config(group_size=64)))
    assert found is not None and (found.method, found.bits, found.group_size, found.sym) == (
        "compressed-tensors",
        4,
        64,
        True,
    )
    assert found.describe() == "compressed-tensors W4A16 (pack-quantized, symmetric), group 64"
    channel = checkpoint_quantization(_Config(_config(num_bits=8, strategy="channel", group_size=None)))
    assert channel is not None and channel.group_size == -1 and "per channel" in channel.describe()


@pytest.mark.parametrize(
    "change,named",
    [
        ({"format": "float-quantized"}, "'float-quantized' format"),
        ({"format": "naive-quantized"}, "'naive-quantized' format"),
        ({"quantization_status": "frozen"}, "quantization_status 'frozen'"),
        ({"weights": {"num_bits": 4, "type": "float"}}, "float 4-bit"),
        ({"weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}}, "int 2-bit"),
        ({"input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}, "activations"),
        ({"weights": {"num_bits": 4, "type": "int", "strategy": "tensor"}}, "tensor scales"),
        ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": "nonsense"}}}, "not valid"),
    ],
)
def test_what_is_not_read_is_a_one_line_error(change, named):
    config = _config()
    group = config["config_groups"]["group_0"]
    for key, value in change.items():
        if key in ("weights", "input_activations"):
            group[key] = value
        else:
            config[key] = value
    with pytest.raises(QuantizationError) as info:
        checkpoint_quantization(_Config(config))
    message = str(info.value)
    assert "\n" not in message and named in message, message


def test_cli_choices_are_the_modules():
    assert quantize_cli.SCHEMES == tuple(compressed.SCHEMES)
    assert quantize_cli.DEFAULT_GROUP_SIZE == compressed.DEFAULT_GROUP_SIZE


# -- vlmrun quantize, end to end ----------------------------------------------------------------


def quantize(model: str, output: Path, scheme: str, *extra: str) -> str:
    assert main(["quantize", "--model", model, "--scheme", scheme, "-o", str(output), *extra]) == 0
    return str(output)


@pytest.fixture(scope="module")
def text_checkpoints(tiny_qwen2, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compressed")
    return {
        "w4a16": quantize(tiny_qwen2, root / "w4a16", "w4a16", "--group-size", "32"),
        "w8a16": quantize(tiny_qwen2, root / "w8a16", "w8a16", "--group-size", "64"),
    }


def _dense_vlm(monkeypatch):
    monkeypatch.setattr(llm_engine, "load_model", functools.partial(load_model, requantize=False))


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_the_written_checkpoint_holds_the_library_layout(text_checkpoints, scheme):
    path = Path(text_checkpoints[scheme])
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == int(scheme[1])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    packed = {n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}
    assert len(packed) == 14  # 2 layers x q, k, v, o, gate, up, down
    assert all(f"{prefix}.weight" not in names for prefix in packed)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_vlm_and_transformers_read_it_alike(text_checkpoints, scheme, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = text_checkpoints[scheme]
    _dense_vlm(monkeypatch)
    llm = vlm.LLM(path, dtype="float32")
    ids = llm.tokenizer.encode(PROMPT)
    params = vlm.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    [(tokens, logits)] = generate_with_logits(llm, [ids], params)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    reference = out.sequences[0, len(ids) :].tolist()
    assert len(set(reference)) >= 8, "reference output is degenerate; equality would prove little"
    assert tokens == reference
    torch.testing.assert_close(logits, torch.stack([step[0] for step in out.logits]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme,kind,group", [("w4a16", "int4", 32), ("w8a16", "int8", None)])
def test_by_default_it_loads_quantized_and_generates(text_checkpoints, scheme, kind, group):
    llm = vlm.LLM(text_checkpoints[scheme], dtype="float32")
    layers = [m for m in llm.engine.model.modules() if isinstance(m, linear.PackableLinear)]
    assert layers and all(m.quantized is not None and m.quant_config.scheme == kind for m in layers)
    if group:
        assert all(m.quant_config.group_size == group for m in layers)
    [out] = llm.generate([PROMPT], vlm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8


def test_vlmrun_check_describes_it(text_checkpoints, capsys):
    assert main(["check", "--model", text_checkpoints["w4a16"]]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = "quantization: compressed-tensors W4A16 (pack-quantized, symmetric), group 32, 8 linear layers quantized"
    assert expected in out, out


def test_a_vision_language_model_keeps_its_tower_dense_and_reads_back_in_transformers(tmp_path, monkeypatch):
    from vlm_plugin_qwen2vl.testing import ReferenceModel, reference_inputs, write_tiny_qwen2_vl

    source = write_tiny_qwen2_vl(tmp_path / "qwen2-vl", "qwen2_vl", seed=0)
    path = quantize(str(source), tmp_path / "qwen2-vl-w4a16", "w4a16", "--group-size", "32")
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    packed = [n for n in names if n.endswith(".weight_packed")]
    assert packed and not any("visual" in n for n in packed)
    assert any("visual" in n and n.endswith(".weight") and "blocks" in n for n in names)
    _dense_vlm(monkeypatch)
    llm = vlm.LLM(path, dtype="float32")
    picture = Image.new("RGB", (64, 48), (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "Hi"}]}]
    inputs = llm.engine.preprocess(messages)
    params = vlm.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [(tokens, logits)] = generate_with_logits(llm, [messages], params)
    reference = ReferenceModel.from_pretrained(path)
    ids = torch.tensor([inputs.token_ids])
    with torch.no_grad():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            min_new_tokens=12,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **reference_inputs(inputs),
        )
    assert tokens == out.sequences[0, ids.shape[1] :].tolist()
    torch.testing.assert_close(logits, torch.stack([step[0] for step in out.logits]), atol=1e-4, rtol=0)


# -- what vlmrun quantize refuses --------------------------------------------------------------


def _one_line_error(capsys, argv: list[str], *named: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and all(n in err for n in named), err
    return err


def test_refusals_are_one_line_and_leave_nothing_behind(tiny_qwen2, text_checkpoints, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    base = ["quantize", "--model", tiny_qwen2, "--scheme", "w4a16"]
    _one_line_error(capsys, [*base, "--group-size", "32", "-o", str(busy)], "not empty", "nothing was written")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    _one_line_error(capsys, [*base, "-o", tiny_qwen2], "the output directory is the model directory")
    # the tiny model's 64 input features are not groups of 128
    _one_line_error(capsys, [*base, "-o", str(tmp_path / "g128")], "64 input features", "--group-size 32 or 64")
    _one_line_error(capsys, [*base, "--group-size", "12", "-o", str(tmp_path / "g12")], "--group-size 12")
    quantized = text_checkpoints["w8a16"]
    _one_line_error(capsys, [*base, "-o", str(tmp_path / "again"), "--model", quantized], "already quantized")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no output, no partial directory


def test_a_model_without_decoder_layers_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ConfigError, match="no decoder-layer weights"):
        compressed.quantize_checkpoint(tmp_path / "m", tmp_path / "out", compressed.WeightScheme(4, 32, True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
