"""Pre-quantized checkpoints (``vlm.quantization.formats``): AWQ (GEMM) and GPTQ (4 and 8 bit, with
and without desc_act / g_idx).

The packed tensors here are written by this file's own packers, straight from the formats' bit
layouts as their reference exporters write them (AutoAWQ ``WQLinear_GEMM.from_linear``: eight
4-bit codes per int32 along the output features, nibble ``i`` (lowest first) holding feature
``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its eight; AutoGPTQ ``QuantLinear.pack``: ``32 / bits`` codes
per int32 along the input features in natural order, zero points packed the same way along the
output features and stored minus one). Word by word with numpy, independent of the vectorized
unpacking under test. The tiny checkpoints are a tiny Qwen2 whose q/k/v/o/gate/up/down weights are
quantized so; vlm on them (dense, fp32) gives the logits of vlm and of transformers on the same
weights dequantized.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vlm
from vlm.cli.main import main
from vlm.engine import llm_engine
from vlm.errors import WeightsError
from vlm.loader import load_model
from vlm.nn import linear
from vlm.nn.weights import load_weights_by_mapping
from vlm.quantization import (
    QuantConfig,
    QuantizationError,
    assign_quant_config,
    checkpoint_quantization,
    dequantized_weights,
)
from vlm.quantization.formats import CheckpointFormat, dequantize_awq, dequantize_gptq, unpack_awq, unpack_int32
from vlm.testing.logits import generate_with_logits

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the spec's, not the module's constant


# -- reference packers (word by word, from the spec) ------------------------------------------


def _words(array: np.ndarray) -> torch.Tensor:
    """uint32 words as the int32 tensor a checkpoint stores."""
    return torch.from_numpy(array.astype(np.uint32).view(np.int32).copy())


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, out]`` 4-bit codes -> ``[rows, out / 8]`` AWQ GEMM words."""
    values = codes.numpy().astype(np.uint32)
    rows, out = values.shape
    words = np.zeros((rows, out // 8), dtype=np.uint32)
    for word in range(out // 8):
        for nibble in range(8):
            words[:, word] |= values[:, 8 * word + AWQ_ORDER[nibble]] << np.uint32(4 * nibble)
    return _words(words)


def pack_gptq_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[in, out]`` codes -> ``[in * bits / 32, out]`` words (GPTQ ``qweight``)."""
    values = codes.numpy().astype(np.uint32)
    per_word = 32 // bits
    words = np.zeros((values.shape[0] // per_word, values.shape[1]), dtype=np.uint32)
    for row in range(words.shape[0]):
        for j in range(per_word):
            words[row] |= values[row * per_word + j] << np.uint32(bits * j)
    return _words(words)


def pack_gptq_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[groups, out]`` codes -> ``[groups, out * bits / 32]`` words (GPTQ ``qzeros``)."""
    return pack_gptq_rows(codes.t().contiguous(), bits).t().contiguous()


# -- reference quantizer ----------------------------------------------------------------------


def quantize_groups(weight: torch.Tensor, group_of: torch.Tensor, groups: int, bits: int, sym: bool):
    """Group-wise quantization of ``[out, in]`` with input feature ``i`` in group ``group_of[i]``:
    codes ``[out, in]``, zero points and fp16 scales ``[groups, out]``, and the dequantized
    ``[out, in]`` weight ``(q - zero) * scale``, each element with its own group's values."""
    maxq = 2**bits - 1
    out_features = weight.shape[0]
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        members = weight[:, group_of == g]
        if sym:
            scale = members.abs().amax(dim=1) / (maxq // 2)
            zero = torch.full((out_features,), (maxq + 1) // 2)
        else:
            low, high = members.amin(dim=1).clamp(max=0), members.amax(dim=1).clamp(min=0)
            scale = (high - low) / maxq
            # a zero point of 0 is not representable in GPTQ v1 (stored minus one): keep it >= 1
            zero = torch.round(-low / scale).clamp(1, maxq).long()
        scales[g], zeros[g] = scale.half(), zero
    s, z = scales.float()[group_of].t(), zeros[group_of].t()  # [out, in]
    codes = torch.round(weight / s + z).clamp(0, maxq).long()
    dense = ((codes - z).double() * s.double()).float()  # exact: a small integer times an fp16 value
    return codes, zeros, scales, dense


def awq_layer(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    in_features = weight.shape[1]
    group_of = torch.arange(in_features) // group_size
    codes, zeros, scales, dense = quantize_groups(weight, group_of, in_features // group_size, 4, sym=False)
    parts = {"qweight": pack_awq(codes.t().contiguous()), "qzeros": pack_awq(zeros), "scales": scales}
    return parts, dense


def gptq_layer(
    weight: torch.Tensor, bits: int, group_size: int, desc_act: bool, sym: bool = True, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    in_features = weight.shape[1]
    size = in_features if group_size == -1 else group_size
    group_of = torch.arange(in_features) // size
    if desc_act:  # act-order: groups follow a permutation of the input features
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        group_of = torch.empty_like(group_of)
        group_of[order] = torch.arange(in_features) // size
    codes, zeros, scales, dense = quantize_groups(weight, group_of, in_features // size, bits, sym)
    parts = {
        "qweight": pack_gptq_rows(codes.t().contiguous(), bits),
        "qzeros": pack_gptq_columns(zeros - 1, bits),  # v1 stores zero - 1
        "scales": scales,
        "g_idx": group_of.to(torch.int32),
    }
    return parts, dense


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.3


# -- unpacking --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_int32_inverts_the_gptq_packing(bits):
    codes = torch.randint(0, 2**bits, (64, 24), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_int32(pack_gptq_rows(codes, bits), bits, dim=0), codes.int())
    assert torch.equal(unpack_int32(pack_gptq_columns(codes.t().contiguous(), bits), bits, dim=1), codes.t().int())


def test_unpack_awq_inverts_the_awq_packing():
    codes = torch.randint(0, 16, (40, 32), generator=torch.Generator().manual_seed(0))
    packed = pack_awq(codes)
    assert (packed < 0).any()  # words with the top bit set are read right too
    assert torch.equal(unpack_awq(packed), codes.int())
    # and the order is AWQ's, not the natural one
    assert not torch.equal(unpack_int32(packed, 4, dim=1), codes.int())


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_dequantizes_to_the_reference(group_size):
    weight = random_weight(48, 128)
    parts, dense = awq_layer(weight, group_size)
    assert parts["qweight"].shape == (128, 6) and parts["qzeros"].shape == (128 // group_size, 6)
    got = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"])
    assert torch.equal(got, dense)
    assert (got - weight).abs().max() <= parts["scales"].float().max() / 2 + 1e-6  # it is a quantization of it


@pytest.mark.parametrize(
    "bits,group_size,desc_act,sym",
    [(4, 32, False, True), (4, 32, True, True), (4, 32, False, False), (8, 32, False, True), (8, 32, True, False)]
    + [(4, -1, False, True), (8, 64, True, True)],
)
def test_gptq_dequantizes_to_the_reference(bits, group_size, desc_act, sym):
    weight = random_weight(40, 128, seed=bits)
    parts, dense = gptq_layer(weight, bits, group_size, desc_act, sym)
    assert parts["qweight"].shape == (128 * bits // 32, 40)
    if desc_act:  # a permuted g_idx, not i // group_size
        size = 128 if group_size == -1 else group_size
        assert not torch.equal(parts["g_idx"].long(), torch.arange(128) // size)
    got = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits, group_size)
    assert torch.equal(got, dense)
    if not desc_act:  # without g_idx, the groups follow from the group size
        got = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], None, bits, group_size)
        assert torch.equal(got, dense)


def test_gptq_v2_zero_points_are_stored_as_they_are():
    weight = random_weight(16, 64)
    parts, dense = gptq_layer(weight, 4, 32, desc_act=False, sym=False)
    zeros = unpack_int32(parts["qzeros"], 4, dim=1) + 1
    v2 = pack_gptq_columns(zeros.long(), 4)
    got = dequantize_gptq(parts["qweight"], v2, parts["scales"], parts["g_idx"], 4, 32, zero_offset=0)
    assert torch.equal(got, dense)


def test_meta_tensors_give_shapes_only():
    weight = random_weight(48, 64)
    awq, _ = awq_layer(weight, 32)
    gptq, _ = gptq_layer(weight, 8, 32, desc_act=True)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in awq.items()}
    assert dequantize_awq(**meta).shape == (48, 64)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in gptq.items()}
    assert dequantize_gptq(**meta, bits=8, group_size=32).shape == (48, 64)


def test_shapes_that_do_not_fit_are_one_line_errors():
    parts, _ = gptq_layer(random_weight(16, 64), 4, 32, desc_act=False)
    with pytest.raises(WeightsError, match=r"GPTQ layer x\.q_proj: shapes .* at 8 bits") as info:
        dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], 8, 32, prefix="x.q_proj")
    assert "\n" not in str(info.value)
    bad = parts["g_idx"].clone()
    bad[0] = 5
    with pytest.raises(WeightsError, match="groups 0..5, but there are 2 scales"):
        dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], bad, 4, 32)
    awq, _ = awq_layer(random_weight(16, 64), 32)
    with pytest.raises(WeightsError, match="AWQ layer"):
        dequantize_awq(awq["qweight"], awq["qzeros"][:1], awq["scales"])


# -- the checkpoint transform -----------------------------------------------------------------

GPTQ4 = CheckpointFormat("gptq", 4, 32, zero_offset=1)
FORMATS_AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}


def test_transform_yields_dense_weights_and_passes_the_rest():
    parts, dense = gptq_layer(random_weight(16, 64), 4, 32, desc_act=False)
    bias = torch.randn(16)
    stream = [
        ("a.qweight", parts["qweight"]),
        ("norm.weight", torch.ones(4)),
        ("a.bias", bias),
        ("a.scales", parts["scales"]),
        ("other.scales", torch.ones(2)),  # no qweight: not a quantized layer
        ("a.qzeros", parts["qzeros"]),
        ("a.g_idx", parts["g_idx"]),
    ]
    got = dict(dequantized_weights(stream, GPTQ4))
    assert set(got) == {"a.weight", "a.bias", "norm.weight", "other.scales"}
    assert torch.equal(got["a.weight"], dense) and got["a.bias"] is bias
    # without g_idx (desc_act off) the layer comes at the end of the stream
    no_g_idx = [(n, t) for n, t in stream if not n.endswith("g_idx")]
    assert torch.equal(dict(dequantized_weights(no_g_idx, GPTQ4))["a.weight"], dense)
    desc_act = CheckpointFormat("gptq", 4, 32, desc_act=True, zero_offset=1)
    with pytest.raises(WeightsError, match="no g_idx, which desc_act needs"):
        dict(dequantized_weights(no_g_idx, desc_act))
    with pytest.raises(WeightsError, match="has g_idx, qweight, scales but no qzeros"):
        dict(dequantized_weights([(n, t) for n, t in stream if not n.endswith("qzeros")], GPTQ4))


# -- quantizing again on the fly --------------------------------------------------------------


def test_requantization_matches_the_checkpoint_and_falls_back_to_int8():
    # the LM head stays dense, as these checkpoints keep it
    int8 = QuantConfig("int8", quantize_lm_head=False)
    assert CheckpointFormat("awq", 4, 64).requantization() == (QuantConfig("int4", 64, quantize_lm_head=False), int8)
    assert CheckpointFormat("gptq", 4, -1).requantization() == (int8, None)  # no int4 group of a row
    assert CheckpointFormat("gptq", 8, 32).requantization() == (int8, None)
    both = CheckpointFormat("gptq", 8, 32, keep_dense=("visual",), lm_head=True).requantization()
    assert both == (QuantConfig("int8", keep_dense=("visual",)), None)
    model = torch.nn.Module()
    model.fits = linear.build_colwise_linear(64, 16)
    model.odd = linear.build_colwise_linear(48, 16)  # not a whole number of groups of 32
    config, fallback = CheckpointFormat("gptq", 4, 32).requantization()
    assert assign_quant_config(model, config, fallback) == ["fits", "odd"]
    assert model.fits.quant_config == config and model.odd.quant_config == int8


def test_gptq_zero_biases_are_optional():
    """AutoGPTQ writes a zero ``bias`` for every quantized layer: where the model has no bias it
    is dropped, where it has one it loads; a non-zero bias the model has no place for is still
    reported."""
    parts, dense = gptq_layer(random_weight(16, 64), 4, 32, desc_act=False)
    zero, real = torch.zeros(16, dtype=torch.float16), torch.ones(16)
    stream = [*((f"a.{p}", t) for p, t in parts.items()), ("a.bias", zero), ("b.bias", real)]
    got = dict(dequantized_weights(stream, GPTQ4))
    model = torch.nn.Module()
    model.a = linear.build_replicated_linear(64, 16)  # no bias
    model.b = linear.build_replicated_linear(64, 16, bias=True)
    report = load_weights_by_mapping(model, [("a.weight", got["a.weight"]), ("a.bias", got["a.bias"])])
    assert report.loaded == 1 and not report.unexpected, report
    assert torch.equal(model.a.weight, dense)
    report = load_weights_by_mapping(model, [("a.bias", got["b.bias"])])  # non-zero: reported
    assert report.unexpected == ["a.bias"]
    report = load_weights_by_mapping(model, [("b.bias", got["a.bias"])])  # the model has it: loaded
    assert "b.bias" not in report.missing and torch.equal(model.b.bias, torch.zeros(16))
    awq = dict(dequantized_weights([("a.bias", torch.zeros(16))], CheckpointFormat("awq", 4, 32)))
    assert not getattr(awq["a.bias"], "vlm_optional", False)  # only GPTQ exporters do this


def test_gptq_checkpoint_of_a_bias_free_model_with_zero_biases_loads(tiny_models, tmp_path):
    """A tiny Llama (no biases) exported the AutoGPTQ way, a zero fp16 ``bias`` beside each
    quantized layer: it loads strictly and gives the dequantized model's logits."""
    source = Path(tiny_models("llama"))
    original = load_file(str(source / "model.safetensors"))
    quantized, dense = {}, {}
    for name, tensor in original.items():
        prefix, _, part = name.rpartition(".")
        if part != "weight" or prefix.rpartition(".")[2] not in PROJECTIONS:
            quantized[name] = dense[name] = tensor
            continue
        parts, dense[name] = gptq_layer(tensor, 4, 32, desc_act=False)
        quantized.update({f"{prefix}.{p}": t for p, t in parts.items()})
        quantized[f"{prefix}.bias"] = torch.zeros(tensor.shape[0], dtype=torch.float16)
    path = _copy_model_dir(source, tmp_path / "gptq", quantized, FORMATS["gptq4"])
    dense_path = _copy_model_dir(source, tmp_path / "dense", dense, None)
    prefixes = _prefixes(dense_path)
    expected = vlm_logits(dense_path, prefixes)
    torch.testing.assert_close(vlm_logits(path, prefixes, requantize=False), expected, rtol=1e-4, atol=1e-4)


def test_layers_the_checkpoint_keeps_dense_stay_dense(checkpoints, tmp_path):
    """AWQ's ``modules_to_not_convert``: those layers are stored dense and are not quantized
    again; a fused layer of which one part is listed stays dense whole. The LM head stays dense
    too (the checkpoint keeps it so)."""
    quantized, dense = checkpoints["awq"]
    state = load_file(str(Path(quantized) / "model.safetensors"))
    dense_state = load_file(str(Path(dense) / "model.safetensors"))
    kept = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    for prefix in kept:
        for part in ("qweight", "qzeros", "scales"):
            del state[f"{prefix}.{part}"]
        state[f"{prefix}.weight"] = dense_state[f"{prefix}.weight"]
    config = {**FORMATS["awq"], "modules_to_not_convert": kept}
    path = _copy_model_dir(Path(quantized), tmp_path / "awq-kept", state, config)
    llm = vlm.LLM(path, dtype="float32")
    model = llm.engine.model
    dense_layers = sorted(
        name for name, m in model.named_modules() if isinstance(m, linear.PackableLinear) and m.quantized is None
    )
    assert dense_layers == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"]
    assert model.lm_head.quantized is None
    prefixes = _prefixes(dense)
    expected = vlm_logits(dense, prefixes)
    torch.testing.assert_close(vlm_logits(path, prefixes, requantize=False), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config,keep,lm_head",
    [
        ({**FORMATS_AWQ, "modules_to_not_convert": ["visual", "mlp.gate"]}, ("visual", "mlp.gate"), False),
        ({**FORMATS_AWQ, "modules_to_not_convert": None}, (), False),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "lm_head": True}, (), True),
    ],
)
def test_checkpoint_exceptions_are_read(config, keep, lm_head):
    found = checkpoint_quantization(_Config(config))
    assert found is not None and found.keep_dense == keep and found.lm_head is lm_head


def test_a_malformed_exception_list_is_a_one_line_error():
    with pytest.raises(QuantizationError, match="modules_to_not_convert.*not a list of module names"):
        checkpoint_quantization(_Config({**FORMATS_AWQ, "modules_to_not_convert": 3}))


# -- reading quantization_config --------------------------------------------------------------


@pytest.mark.parametrize(
    "config,expected",
    [
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM", "zero_point": True},
            "AWQ 4-bit (GEMM), group 128",
        ),
        ({"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": True}, "GPTQ 8-bit, group 32, desc_act"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "GPTQ 4-bit, per row"),
    ],
)
def test_supported_configs(config, expected):
    found = checkpoint_quantization(_Config(config))
    assert found is not None and found.describe() == expected


class _Config:
    def __init__(self, quantization_config: dict | None, nested: bool = False) -> None:
        self.text = _Config(quantization_config) if nested else None
        self.quantization_config = None if nested else quantization_config

    def get_text_config(self):
        return self.text or self


def test_nested_text_config_and_none():
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    found = checkpoint_quantization(_Config(config, nested=True))
    assert found is not None and found.method == "gptq"
    assert checkpoint_quantization(_Config(None)) is None


@pytest.mark.parametrize(
    "config,named",
    [
        ({"quant_method": "fp8"}, "quant_method 'fp8'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ 4-bit in the 'gemv' layout"),
        ({"quant_method": "awq", "bits": 4, "backend": "llm-awq"}, "AWQ 4-bit in the 'llm-awq' layout"),
        ({"quant_method": "gptq", "bits": 3}, "GPTQ 3-bit"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin' checkpoint format"),
    ],
)
def test_unsupported_quantization_is_a_one_line_error(config, named):
    with pytest.raises(QuantizationError) as info:
        checkpoint_quantization(_Config(config))
    message = str(info.value)
    assert "\n" not in message and named in message, message
    assert "supported: awq (4-bit, GEMM), gptq (4- or 8-bit) and compressed-tensors" in message, message


# -- tiny checkpoints, end to end -------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
    "gptq4": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
    "gptq4-desc_act": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False},
    "gptq8": {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": False, "sym": True},
}


def _copy_model_dir(source: Path, target: Path, state: dict[str, torch.Tensor], quantization: dict | None) -> str:
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    if quantization is not None:
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = quantization
        (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return str(target)


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Per format: the quantized checkpoint and the same weights dequantized (fp32)."""
    source = Path(tiny_models("qwen2"))
    original = load_file(str(source / "model.safetensors"))
    root = tmp_path_factory.mktemp("quantized-checkpoints")
    result = {}
    for seed, (label, config) in enumerate(FORMATS.items()):
        quantized, dense = {}, {}
        for name, tensor in original.items():
            prefix, _, part = name.rpartition(".")
            if part != "weight" or prefix.rpartition(".")[2] not in PROJECTIONS:
                quantized[name] = dense[name] = tensor
                continue
            if config["quant_method"] == "awq":
                parts, weight = awq_layer(tensor, config["group_size"])
            else:
                parts, weight = gptq_layer(
                    tensor, config["bits"], config["group_size"], config["desc_act"], config["sym"], seed
                )
            quantized.update({f"{prefix}.{p}": t for p, t in parts.items()})
            dense[name] = weight
        result[label] = (
            _copy_model_dir(source, root / label, quantized, config),
            _copy_model_dir(source, root / f"{label}-dequantized", dense, None),
        )
    return result


ONE = vlm.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
PROMPT = "The quick brown fox jumps over the lazy dog"


def _prefixes(path: str) -> list[list[int]]:
    ids = vlm.LLM(path, dtype="float32").tokenizer.encode(PROMPT)
    return [ids[:n] for n in range(len(ids) - 4, len(ids) + 1)]


def vlm_logits(path: str, prefixes: list[list[int]], requantize: bool = True) -> torch.Tensor:
    """With ``requantize=False`` a pre-quantized checkpoint's layers stay dense (dequantized)."""
    if requantize:
        llm = vlm.LLM(path, dtype="float32")
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(llm_engine, "load_model", functools.partial(load_model, requantize=False))
            llm = vlm.LLM(path, dtype="float32")
    return torch.stack([logits[0] for _, logits in generate_with_logits(llm, prefixes, ONE)])


def transformers_logits(path: str, prefixes: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prefixes[-1]])).logits[0]
    return torch.stack([logits[len(prefix) - 1] for prefix in prefixes])


@pytest.mark.parametrize("label", list(FORMATS))
def test_quantized_checkpoint_gives_the_dequantized_models_logits(checkpoints, label, monkeypatch):
    quantized, dense = checkpoints[label]
    prefixes = _prefixes(dense)
    expected = vlm_logits(dense, prefixes)
    reference = transformers_logits(dense, prefixes)
    torch.testing.assert_close(expected, reference, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(llm_engine, "load_model", functools.partial(load_model, requantize=False))
    got = vlm_logits(quantized, prefixes)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("label,scheme", [("awq", "int4"), ("gptq8", "int8")])
def test_by_default_the_layers_are_quantized_again_and_generate(checkpoints, label, scheme, caplog):
    quantized, _ = checkpoints[label]
    with caplog.at_level("INFO", logger="vlm"):
        llm = vlm.LLM(quantized, dtype="float32")
    assert any("dequantized while loading and quantized again" in r.getMessage() for r in caplog.records)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, linear.PackableLinear)]
    assert layers and all(m.quantized is not None and m.quant_config.scheme == scheme for m in layers)
    [out] = llm.generate([PROMPT], vlm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8


def test_vlmrun_check_shows_the_quantization(checkpoints, capsys):
    quantized, _ = checkpoints["gptq4-desc_act"]
    assert main(["check", "--model", quantized]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "quantization: GPTQ 4-bit, group 32, desc_act, 8 linear layers quantized" in out, out
    assert main(["check", "--model", quantized, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"].startswith("GPTQ 4-bit") and report["ok"]


def test_unsupported_checkpoint_is_a_one_line_cli_error(checkpoints, tmp_path, capsys):
    _, dense = checkpoints["awq"]
    path = _copy_model_dir(
        Path(dense), tmp_path / "fp8", load_file(str(Path(dense) / "model.safetensors")), {"quant_method": "fp8"}
    )
    assert main(["--model", path, "--prompt", "Hello", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "'fp8'" in err and "awq" in err and "gptq" in err, err
