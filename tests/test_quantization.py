"""Weight-only quantization (``vlm.quantization``): each scheme's round trip and GEMM, the quantized
``vlm.nn`` linears under tensor parallelism, and the engine, a VLM and the CLI with ``--quantize``.

The reference for every quantized GEMM is ``F.linear`` with the weight the scheme dequantizes to,
so the kernels are checked up to fp32 rounding; the quantization error itself is checked against
its bound (half a quantization step per weight) and, end to end, against the fp32 model's tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import vlm
from vlm.cli.main import main
from vlm.errors import ConfigError
from vlm.nn import linear
from vlm.quantization import (
    QuantConfig,
    QuantizationError,
    assign_quant_config,
    cpu_kernel_dtype,
    int4,
    int8,
    quantize,
)
from vlm.quantization.base import QuantizedWeight
from vlm.quantization.config import LM_HEAD
from vlm.testing.logits import generate_with_logits

BATCHES = (1, 3, 16)
# odd output sizes (the int4 kernel pads to a multiple of 16), inputs a few int4 groups long
INT4_SHAPES = [(1, 128), (40, 256), (129, 384), (16, 640)]
# inputs a multiple of 16, as torch's bf16 kernel needs (others: test_int8_fallback_for_odd_inputs)
INT8_SHAPES = [(1, 16), (37, 48), (129, 208), (64, 896)]


def weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


def inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_gemm_matches(quantized: QuantizedWeight, in_features: int, rows: int, compute: torch.dtype) -> None:
    """The quantized GEMM (fp32 activations, the kernel computing in ``compute``) equals ``F.linear``
    with the dequantized weight: up to fp32 rounding, or, computing in bf16, up to the bf16
    rounding of the result (the input is rounded to bf16 in the reference too)."""
    x = inputs((rows, in_features))
    bias = inputs((quantized.out_features,), seed=2)
    got = quantized.matmul(x, bias)
    assert got.dtype == torch.float32
    if compute == torch.float32:
        expected = F.linear(x, quantized.dequantize(), bias)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the bias is added in fp32, after the product is rounded (half a bf16 ulp: 2^-9)
        expected = F.linear(x.to(compute).float(), quantized.dequantize())
        torch.testing.assert_close(got - bias, expected, rtol=2**-8, atol=1e-5)


COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- schemes --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", INT8_SHAPES)
def test_int8_round_trip_is_within_half_a_step(shape):
    w = weight(*shape)
    q = int8.quantize(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (shape[0],)
    step = q.scales[:, None]
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_int4_round_trip_is_within_half_a_step(shape, group_size):
    out_features, in_features = shape
    if in_features % group_size:
        pytest.skip("not a whole number of groups")
    w = weight(*shape)
    q = int4.quantize(w, group_size)
    assert q.qweight.shape == (out_features, in_features // 2) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (out_features, in_features // group_size)
    assert int(q.codes().min()) >= 0 and int(q.codes().max()) <= 15
    step = q.scales.repeat_interleave(group_size, dim=1)
    # half a step, plus the fp32 rounding of the zero point
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_a_constant_row_or_group_survives():
    w = weight(32, 128)
    w[3] = 0.0
    w[5, :64] = 0.25
    for q in (int8.quantize(w), int4.quantize(w, 64)):
        dequantized = q.dequantize()
        assert torch.equal(dequantized[3], w[3])  # no 0 / 0
        # the largest value of a row (int8) or the whole of a constant group (int4) comes back
        torch.testing.assert_close(dequantized[5, :64], w[5, :64], rtol=0, atol=1e-7)


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("rows", BATCHES)
@pytest.mark.parametrize("shape", INT8_SHAPES)
def test_int8_gemm_matches_dequantized_linear(shape, rows, compute):
    assert_gemm_matches(int8.quantize(weight(*shape), COMPUTE[compute]), shape[1], rows, COMPUTE[compute])


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("rows", BATCHES)
@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_int4_cpu_kernel_matches_dequantized_linear(shape, rows, compute):
    portable = int4.quantize(weight(*shape), 64 if shape[1] % 128 else 128, COMPUTE[compute])
    kernel = portable.for_cpu_kernel(COMPUTE[compute])
    assert kernel is not None, "torch's int4 CPU kernel is missing from this build"
    # the kernel's packed layout holds exactly the portable weight (read back through the kernel)
    torch.testing.assert_close(kernel.dequantize(), portable.dequantize(), rtol=1e-6, atol=1e-6)
    assert_gemm_matches(kernel, shape[1], rows, COMPUTE[compute])


def test_fp32_layers_compute_in_bf16_on_x86():
    """torch's x86 int8 / int4 kernels are vectorized for bf16 only (fp32 is a scalar loop, 5-50x
    slower): an fp32 layer's quantized GEMM computes in bf16 there, and returns fp32."""
    x86 = torch.backends.cpu.get_cpu_capability().startswith("AVX")
    expected = torch.bfloat16 if x86 else torch.float32
    assert cpu_kernel_dtype(torch.float32) == expected
    assert cpu_kernel_dtype(torch.bfloat16) == torch.bfloat16
    int8_weight = quantize(weight(48, 256), QuantConfig("int8"))
    int4_weight = quantize(weight(48, 256), QuantConfig("int4", group_size=64))
    assert isinstance(int8_weight, int8.Int8Weight) and int8_weight.scales.dtype == expected
    assert isinstance(int4_weight, int4.Int4CpuWeight) and int4_weight.scales_and_zeros.dtype == expected
    for quantized in (int8_weight, int4_weight):
        assert_gemm_matches(quantized, 256, 3, expected)


@pytest.mark.parametrize("in_features", [7, 53, 200])
def test_int8_fallback_for_odd_inputs(in_features):
    """torch's bf16 int8 kernel needs inputs in multiples of 16 (it returns garbage, or crashes,
    otherwise): such layers dequantize and run ``F.linear`` in the activations' dtype."""
    quantized = int8.quantize(weight(37, in_features), torch.bfloat16)
    assert_gemm_matches(quantized, in_features, 3, torch.float32)


def test_fallback_outside_the_cpu_kernels():
    """Dtypes torch's kernels do not take (float64 here; CUDA tensors likewise) dequantize and
    run ``F.linear``: the portable int4 layout, and int8 whatever the dtype."""
    w = weight(40, 128).double()
    for quantized in (int8.quantize(w), quantize(w, QuantConfig("int4", group_size=32))):
        assert type(quantized) in (int8.Int8Weight, int4.Int4Weight)
        x = inputs((3, 5, 128)).double()
        torch.testing.assert_close(quantized.matmul(x, None), F.linear(x, quantized.dequantize(torch.float64)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_activations(scheme):
    w = weight(48, 256).bfloat16()
    quantized = quantize(w, QuantConfig(scheme, group_size=64))
    x = inputs((4, 256)).bfloat16()
    out = quantized.matmul(x, None)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), quantized.dequantize())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_bad_settings_are_one_line_errors():
    for kwargs in ({"scheme": "int3"}, {"scheme": "int4", "group_size": 48}):
        with pytest.raises(QuantizationError) as info:
            QuantConfig(**kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="quantization"):
        vlm.LLM("unused", quantization="int2")


# -- quantized vlm.nn linears and tensor parallelism ----------------------------------------


def build_and_load(
    monkeypatch, world: int, rank: int, make, tensors: dict, prepare: bool = True
) -> linear.PackableLinear:
    """A layer as rank ``rank`` of ``world`` builds it, loaded with the full ``tensors`` (and prepared)."""
    monkeypatch.setattr(linear, "tp_world_size", lambda: world)
    monkeypatch.setattr(linear, "tp_rank", lambda: rank)
    layer = make()
    for shard, tensor in tensors.items():
        param = layer.weight
        if shard is None:
            param.weight_loader(param, tensor)  # type: ignore[attr-defined]
        else:
            param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]
    if prepare:
        layer.prepare_for_inference()
    return layer


CONFIGS = [QuantConfig("int8"), QuantConfig("int4", group_size=32)]

# name -> (builder(quant_config), checkpoint tensors by shard id, world size)
LAYERS = {
    "colwise": (
        lambda q: linear.build_colwise_linear(96, 64, quant_config=q),
        {None: weight(64, 96)},
        2,
    ),
    "rowwise": (
        lambda q: linear.build_rowwise_linear(192, 48, quant_config=q),
        {None: weight(48, 192)},
        2,
    ),
    "rowwise-4": (
        lambda q: linear.build_rowwise_linear(256, 40, quant_config=q),
        {None: weight(40, 256)},
        4,
    ),
    "merged": (
        lambda q: linear.build_merged_colwise_linear(64, [96, 96], quant_config=q),
        {0: weight(96, 64, seed=1), 1: weight(96, 64, seed=2)},
        2,
    ),
    "qkv": (
        lambda q: linear.build_qkv_proj(64, 16, 4, 2, quant_config=q),
        {"q": weight(64, 64, seed=3), "k": weight(32, 64, seed=4), "v": weight(32, 64, seed=5)},
        2,
    ),
    "qkv-replicated-kv": (
        lambda q: linear.build_qkv_proj(64, 16, 4, 1, quant_config=q),
        {"q": weight(64, 64, seed=3), "k": weight(16, 64, seed=4), "v": weight(16, 64, seed=5)},
        4,
    ),
}


@pytest.fixture
def fp32_kernels(monkeypatch):
    """Quantized fp32 layers compute in fp32 (not bf16, see ``cpu_kernel_dtype``), so that results
    can be compared up to fp32 rounding; slow kernels, but tiny shapes."""
    import vlm.quantization

    monkeypatch.setattr(vlm.quantization, "cpu_kernel_dtype", lambda dtype: dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_tensor_parallel_shards_equal_the_unsharded_quantized_layer(monkeypatch, fp32_kernels, name, config):
    """Each rank's quantized weight is exactly its slice of the unsharded quantized weight (the
    layer's own loader cuts that slice from the dequantized checkpoint), and its GEMM matches."""
    make, tensors, world = LAYERS[name]
    full = build_and_load(monkeypatch, 1, 0, lambda: make(config), tensors)
    assert full.quantized is not None and full.weight.numel() == 0  # the dense weight is freed
    full_weight = full.quantized.dequantize()
    # the unsharded layer's dequantized weight, split back into the checkpoint's tensors
    sizes = [tensor.shape[0] for tensor in tensors.values()]
    dequantized = dict(zip(tensors, full_weight.split(sizes)))
    x = inputs((5, full_weight.shape[1]))
    partial_sum = torch.zeros(5, full_weight.shape[0])
    for rank in range(world):
        shard = build_and_load(monkeypatch, world, rank, lambda: make(config), tensors)
        expected_weight = build_and_load(monkeypatch, world, rank, lambda: make(None), dequantized, False).weight
        assert shard.quantized is not None
        torch.testing.assert_close(shard.quantized.dequantize(), expected_weight, rtol=0, atol=1e-7)
        x_rank = x if not name.startswith("rowwise") else x.chunk(world, dim=1)[rank]
        torch.testing.assert_close(shard(x_rank), F.linear(x_rank, expected_weight), rtol=1e-5, atol=1e-5)
        if name.startswith("rowwise"):
            partial_sum += shard(x_rank)  # all_reduce is a no-op here: the process group has one rank
    if name.startswith("rowwise"):
        torch.testing.assert_close(partial_sum, full(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_quantize_as_soon_as_their_weight_has_loaded(monkeypatch, name):
    """So that loading holds one layer in full precision at a time: the last shard of the weight
    quantizes the layer and frees the dense weight, before prepare_for_inference, which then
    keeps it; the result is the same as quantizing after loading."""
    make, tensors, _ = LAYERS[name]
    monkeypatch.setattr(linear, "tp_world_size", lambda: 1)
    monkeypatch.setattr(linear, "tp_rank", lambda: 0)
    config = QuantConfig("int8")
    layer = make(config)
    shards = list(tensors.items())
    for shard, tensor in shards:
        assert layer.quantized is None, "quantized before its last shard"
        args = (layer.weight, tensor) if shard is None else (layer.weight, tensor, shard)
        layer.weight.weight_loader(*args)  # type: ignore[attr-defined]
    quantized = layer.quantized
    assert quantized is not None and layer.weight.numel() == 0
    layer.prepare_for_inference()
    assert layer.quantized is quantized
    late = make(None)
    for shard, tensor in shards:
        args = (late.weight, tensor) if shard is None else (late.weight, tensor, shard)
        late.weight.weight_loader(*args)  # type: ignore[attr-defined]
    assert late.quantized is None  # no config: nothing happens while loading
    torch.testing.assert_close(quantized.dequantize(), quantize(late.weight, config).dequantize(), rtol=0, atol=0)


def test_a_fused_qkv_tensor_quantizes_its_layer_when_loaded():
    layer = linear.build_qkv_proj(64, 16, 4, 2, quant_config=QuantConfig("int8"))
    layer.weight.weight_loader(layer.weight, weight(128, 64))  # type: ignore[attr-defined]
    assert layer.quantized is not None


def test_int8_quantizes_large_matrices_in_blocks_of_rows(monkeypatch):
    w = weight(37, 48)
    whole = int8.quantize(w, torch.bfloat16)
    monkeypatch.setattr(int8, "_QUANTIZE_ROWS", 5)
    blocks = int8.quantize(w, torch.bfloat16)
    assert torch.equal(blocks.qweight, whole.qweight) and torch.equal(blocks.scales, whole.scales)
    absmax = w.abs().amax(dim=1) * 2
    assert torch.equal(int8.quantize(w, None, absmax).scales, absmax / 127)


def test_int4_groups_cut_by_a_tensor_parallel_split_are_a_one_line_error(monkeypatch):
    monkeypatch.setattr(linear, "tp_world_size", lambda: 2)
    with pytest.raises(QuantizationError) as info:
        linear.build_rowwise_linear(192, 48, quant_config=QuantConfig("int4", group_size=64))
    message = str(info.value)
    assert "\n" not in message
    for needle in ("192", "96 input features per rank", "tensor-parallel size 2", "groups of 64", "32"):
        assert needle in message, (needle, message)
    # the engine's pass names the layer
    model = torch.nn.Module()
    model.down_proj = linear.build_rowwise_linear(192, 48)
    with pytest.raises(QuantizationError, match="down_proj"):
        assign_quant_config(model, QuantConfig("int4", group_size=128))
    # int8 and whole groups are fine
    linear.build_rowwise_linear(192, 48, quant_config=QuantConfig("int8"))
    linear.build_rowwise_linear(192, 48, quant_config=QuantConfig("int4", group_size=32))


def test_a_layer_built_with_its_own_config_keeps_it():
    model = torch.nn.Module()
    model.own = linear.build_colwise_linear(64, 32, quant_config=QuantConfig("int4", group_size=32))
    model.plain = linear.build_colwise_linear(64, 32)
    assert assign_quant_config(model, QuantConfig("int8")) == ["plain"]
    assert model.own.quant_config == QuantConfig("int4", group_size=32)


# -- engine, VLM, CLI -----------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog. Then"
STEPS = 32
GREEDY = vlm.SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
ONE = vlm.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


@pytest.fixture(scope="module")
def fp32_run(tiny_qwen2):
    """fp32's 32 greedy tokens, and the prompt followed by each of their prefixes."""
    llm = vlm.LLM(tiny_qwen2)
    prompt = llm.engine.tokenizer(PROMPT)["input_ids"]
    [(tokens, _)] = generate_with_logits(llm, [prompt], GREEDY)
    assert len(set(tokens)) >= 16, tokens  # varied: agreement on a repeated token would prove little
    prefixes = [prompt + tokens[:step] for step in range(STEPS)]
    return tokens, prefixes, next_token_logits(llm, prefixes)


def next_token_logits(llm, prefixes: list[list[int]]) -> torch.Tensor:
    """``[prefixes, vocab]``: the logits of the token after each prefix (teacher forcing)."""
    return torch.stack([logits[0] for _, logits in generate_with_logits(llm, prefixes, ONE)])


def quantized_layers(model: torch.nn.Module) -> dict[str, bool]:
    return {
        name: module.quantized is not None
        for name, module in model.named_modules()
        if isinstance(module, linear.PackableLinear)
    }


def test_int8_engine_follows_fp32(tiny_qwen2, fp32_run):
    """Teacher-forced top-1 agreement with fp32 over its 32 greedy steps (each step predicted from
    fp32's prefix, so one miss does not spoil the rest), and the first step's logits.

    Measured here: 27/32 with the LM head dense, 28/32 with it int8 too (the default), and 30/32
    with the kernels computing in fp32 instead of bf16 (head dense); the unquantized model run in
    bf16: 31/32; first-step logits within 3.5% of their largest magnitude. tiny_qwen2
    is a random model with a large initializer_range (0.3, so that its output varies), far more
    sensitive than a trained one: int8 moves its logits by up to ~1.7, and fp32's top-1 margin is
    under 0.5 at 14 of the 32 steps; the misses are all among those (margins 0.004-0.34). So: every
    step with a clear winner (margin >= 0.5) must agree, and 26 overall leaves one more near-tie
    for other CPUs' rounding. A broken kernel or scale agrees at chance (~1/320 per step).
    """
    tokens, prefixes, expected = fp32_run
    llm = vlm.LLM(tiny_qwen2, quantization="int8")
    layers = quantized_layers(llm.engine.model)
    assert layers and all(layers.values()), layers
    got = next_token_logits(llm, prefixes)
    agrees = [int(p) == t for p, t in zip(got.argmax(dim=-1), tokens)]
    print(f"int8: top-1 agreement with fp32 {sum(agrees)}/{STEPS}")
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.5
    assert all(agree for agree, is_clear in zip(agrees, clear.tolist()) if is_clear), agrees
    assert sum(agrees) >= 26, agrees
    first_error = (got[0] - expected[0]).abs().max() / expected[0].abs().max()
    print(f"int8: first-step logit error {float(first_error):.3f} of the largest logit")
    assert first_error <= 0.08, float(first_error)
    [free] = llm.generate([prefixes[0]], GREEDY)  # and it generates on its own
    assert len(free.outputs[0].token_ids) == STEPS


@pytest.mark.parametrize("scheme,group_size", [("int8", 128), ("int4", 32), ("int4", 64)])
def test_quantized_engine_is_fp32_on_the_dequantized_checkpoint(
    tiny_qwen2, fp32_run, fp32_kernels, tmp_path, scheme, group_size
):
    """The whole quantized path (assigning configs, loading, fusing q/k/v and gate/up, quantizing
    the linears and the LM head, the kernels) computes exactly what the fp32 engine computes on a checkpoint whose linear
    weights were quantized and dequantized beforehand: any error left is the quantization's own.
    (Each checkpoint tensor can be quantized alone because scales and groups never span rows.)"""
    config = QuantConfig(scheme, group_size)
    state = load_file(str(Path(tiny_qwen2) / "model.safetensors"))
    for name, tensor in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            state[name] = quantize(tensor, config).dequantize()
        elif name == "lm_head.weight":  # int8 per row under every scheme
            state[name] = quantize(tensor, LM_HEAD).dequantize()
    fake = tmp_path / "dequantized"
    fake.mkdir()
    for item in Path(tiny_qwen2).iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, fake / item.name)
    save_file(state, str(fake / "model.safetensors"), metadata={"format": "pt"})

    _, prefixes, _ = fp32_run
    expected = next_token_logits(vlm.LLM(str(fake)), prefixes)
    got = next_token_logits(vlm.LLM(tiny_qwen2, quantization=scheme, quantization_group_size=group_size), prefixes)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_vision_tower_stays_in_the_model_dtype(tmp_path):
    from vlm_plugin_internvl.testing import write_tiny_internvl

    path = write_tiny_internvl(tmp_path / "internvl", "hf", seed=0)
    question = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.new("RGB", (64, 48), "teal")}, {"type": "text", "text": "Hi"}],
        }
    ]
    params = vlm.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for quantize_vision in (False, True):
        llm = vlm.LLM(str(path), quantization="int8", quantize_vision=quantize_vision)
        layers = quantized_layers(llm.engine.model)
        language = {name: q for name, q in layers.items() if name.startswith("language_model.")}
        vision = {name: q for name, q in layers.items() if not name.startswith("language_model.")}
        assert language and all(language.values()), language
        assert vision and all(q == quantize_vision for q in vision.values()), vision
        if not quantize_vision:
            dense = [m for m in llm.engine.model.modules() if isinstance(m, linear.PackableLinear) and not m.quantized]
            assert all(m.weight.dtype == torch.float32 for m in dense)
        [out] = llm.chat(question, params)
        assert len(out.outputs[0].token_ids) == 4


def test_cli_quantize_int4(tiny_models, capsys):
    model = tiny_models("qwen2", hidden_size=128, intermediate_size=256)  # whole groups of 128
    argv = ["--model", model, "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0"]
    assert main([*argv, "--quantize", "int4"]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_int4_group_size_that_does_not_fit_is_a_one_line_error(tiny_qwen2, capsys):
    argv = ["--model", tiny_qwen2, "--prompt", "Hello", "--max-tokens", "4", "--quantize", "int4"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "groups of 128" in err and "--quantization-group-size 32 or 64" in err, err
    assert main([*argv, "--quantization-group-size", "64"]) == 0


def test_engine_settings_reach_the_engine_config():
    import argparse

    from vlm.cli.engine_args import add_engine_arguments, engine_settings

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--quantize", "int4", "--quantization-group-size", "64", "--quantize-vision"])
    assert engine_settings(args) == {"quantization": "int4", "quantization_group_size": 64, "quantize_vision": True}
    assert engine_settings(parser.parse_args([])) == {}


def test_weights_shrink():
    """int8 keeps a byte per weight plus a scale per row; int4 half a byte plus two values per group."""
    w = weight(256, 512)
    dense = w.numel() * 4
    assert int8.quantize(w).nbytes() == w.numel() + 256 * 4
    kernel = int4.quantize(w, 128).for_cpu_kernel(torch.float32)
    assert kernel is not None and kernel.nbytes() == w.numel() // 2 + 256 * 4 * 2 * 4
    assert kernel.nbytes() < dense / 6
