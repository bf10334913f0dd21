"""GEMMs on weight-only quantized weights (``vlm.kernels.int8_weight_matmul`` /
``int4_weight_matmul``): the Triton kernels against ``dequantize()`` + ``F.linear``, the torch
path, and the routing from ``Int8Weight.matmul`` / ``Int4Weight.matmul``.

Without a GPU the Triton kernels run on CPU tensors in triton's interpreter (TRITON_INTERPRET is
set below, before vlm.kernels.triton_quant_matmul is first imported; see test_kernels.py). The
interpreter pays per program instance, so shapes are small, and the "small" block sizes make
them span several tiles along every dimension, with ragged last tiles.
"""

import importlib
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlm import kernels as K  # noqa: E402
from vlm.quantization import int4, int8  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# largest error relative to the largest output; bf16 is rounded on output (and truncated, not
# rounded, under the interpreter), fp16 too, fp32 is an fp32 GEMM
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
ROWS = [1, 3, 17]  # decode GEMV, a few rows, more than one 16-row tile
# default blocks, and small ones: several tiles over rows, outputs and inputs, the last ragged
BLOCKS = {"default": {}, "small": dict(block_m=16, block_n=16, block_k=32)}
INT8_SHAPES = [(50, 96), (64, 90)]  # (out, in): neither a multiple of the blocks
INT4_SHAPES = [(32, 96), (64, 128), (128, 256)]  # (group_size, in), out = 50


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    # An ambient VLM_KERNELS must not change what these tests exercise.
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def tq():
    """The Triton module, under the interpreter (or on a GPU)."""
    pytest.importorskip("triton")
    module = importlib.import_module("vlm.kernels.triton_quant_matmul")
    if not ON_GPU and not module.INTERPRETED:
        pytest.skip("triton kernels were defined before TRITON_INTERPRET=1 was set, and there is no GPU")
    return module


@pytest.fixture
def force_triton(tq, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    return tq


def int8_weight(out_features, in_features, dtype):
    q = int8.quantize(torch.randn(out_features, in_features), dtype)
    return int8.Int8Weight(q.qweight.to(DEVICE), q.scales.to(DEVICE))


def int4_weight(out_features, in_features, group_size, dtype):
    # an offset, so that the zero points matter
    q = int4.quantize(torch.randn(out_features, in_features) + 0.5, group_size, dtype)
    return int4.Int4Weight(q.qweight.to(DEVICE), q.scales.to(DEVICE), q.zeros.to(DEVICE), group_size)


def inputs(shape, out_features, dtype, with_bias):
    x = torch.randn(*shape).to(device=DEVICE, dtype=dtype)
    bias = torch.randn(out_features).to(device=DEVICE, dtype=dtype) if with_bias else None
    return x, bias


def expected(weight, x, bias):
    """``F.linear`` with the weight as the scheme dequantizes it to x's dtype, computed in fp32."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.dequantize(x.dtype).float(), b)


def assert_matches(actual, x, weight, bias):
    assert actual.dtype == x.dtype
    assert actual.shape == (*x.shape[:-1], weight.out_features)
    ref = expected(weight, x, bias)
    err = (actual.float() - ref).abs().max().item()
    assert err <= TOLERANCES[x.dtype] * ref.abs().max().item(), f"max error {err:.3g}"


# --------------------------------------------------------------------------
# Triton kernels vs dequantize + F.linear
# --------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", sorted(BLOCKS))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_features,in_features", INT8_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_kernel(tq, rows, out_features, in_features, dtype, with_bias, blocks):
    w = int8_weight(out_features, in_features, dtype)
    x, bias = inputs((rows, in_features), out_features, dtype, with_bias)
    out = tq.int8_weight_matmul(x, w.qweight, w.scales, bias, **BLOCKS[blocks])
    assert_matches(out, x, w, bias)


@pytest.mark.parametrize("blocks", sorted(BLOCKS))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size,in_features", INT4_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int4_kernel(tq, rows, group_size, in_features, dtype, with_bias, blocks):
    w = int4_weight(50, in_features, group_size, dtype)
    x, bias = inputs((rows, in_features), 50, dtype, with_bias)
    out = tq.int4_weight_matmul(x, w.qweight, w.scales, w.zeros, group_size, bias, **BLOCKS[blocks])
    assert_matches(out, x, w, bias)


@pytest.mark.parametrize(
    "group_size,in_features,block_k",
    [(32, 128, 64), (32, 96, 128), (48, 96, None), (64, 192, 128)],
    ids=["group32-tile64", "group32-tile128", "group48", "group64-tile128"],
)
def test_int4_kernel_tiles_spanning_groups(tq, group_size, in_features, block_k):
    """A K tile longer than a group (or a group size no tile divides) reads a scale and zero per
    feature pair instead of one per column."""
    w = int4_weight(40, in_features, group_size, torch.float32)
    x, bias = inputs((5, in_features), 40, torch.float32, True)
    out = tq.int4_weight_matmul(x, w.qweight, w.scales, w.zeros, group_size, bias, block_k=block_k)
    assert_matches(out, x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_3d_and_strided_inputs(tq, dtype):
    w8 = int8_weight(50, 96, dtype)
    w4 = int4_weight(50, 96, 32, dtype)
    x, bias = inputs((2, 3, 96), 50, dtype, True)
    assert_matches(tq.int8_weight_matmul(x, w8.qweight, w8.scales, bias), x, w8, bias)
    assert_matches(tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 32, bias), x, w4, bias)
    # rows of a wider tensor (row stride != in) and a transposed view (unit stride elsewhere)
    wide = torch.randn(4, 160).to(device=DEVICE, dtype=dtype)[:, 32:128]
    transposed = torch.randn(96, 4).to(device=DEVICE, dtype=dtype).t()
    for x in (wide, transposed):
        assert_matches(tq.int8_weight_matmul(x, w8.qweight, w8.scales), x, w8, None)
        assert_matches(tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 32), x, w4, None)


def test_no_rows(tq):
    w8 = int8_weight(50, 96, torch.float32)
    w4 = int4_weight(50, 96, 32, torch.float32)
    x = torch.empty(0, 96, device=DEVICE)
    assert tq.int8_weight_matmul(x, w8.qweight, w8.scales).shape == (0, 50)
    assert tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 32).shape == (0, 50)


def test_bad_arguments(tq):
    w8 = int8_weight(50, 96, torch.float32)
    w4 = int4_weight(50, 96, 32, torch.float32)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 96\]"):
        tq.int8_weight_matmul(x, w8.qweight, w8.scales)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 96\]"):
        tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 32)
    x = torch.randn(3, 96, device=DEVICE)
    with pytest.raises(ValueError, match="group_size"):
        tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 64)
    with pytest.raises(ValueError, match="qweight must be int8"):
        tq.int8_weight_matmul(x, w4.qweight, w8.scales)
    with pytest.raises(ValueError, match="bias must be"):
        tq.int8_weight_matmul(x, w8.qweight, w8.scales, torch.zeros(49, device=DEVICE))
    with pytest.raises(ValueError, match="block_k"):
        tq.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 32, block_k=16)


# --------------------------------------------------------------------------
# The ops' torch path, and the routing from the quantized weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_is_dequantize_and_linear(monkeypatch, dtype):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    w8 = int8_weight(50, 96, dtype)
    w4 = int4_weight(50, 128, 64, dtype)
    x, bias = inputs((2, 3, 96), 50, dtype, True)
    torch.testing.assert_close(K.int8_weight_matmul(x, w8.qweight, w8.scales, bias), w8.dense_matmul(x, bias))
    x, bias = inputs((3, 128), 50, dtype, True)
    torch.testing.assert_close(
        K.int4_weight_matmul(x, w4.qweight, w4.scales, w4.zeros, 64, bias), w4.dense_matmul(x, bias)
    )


@pytest.fixture
def spies(tq, monkeypatch):
    """Count the calls that reach the Triton module's ops."""
    calls = []
    for name in ("int8_weight_matmul", "int4_weight_matmul"):
        op = getattr(tq, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)

        monkeypatch.setattr(tq, name, spy)
    return calls


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_quantized_weights_route_to_triton(force_triton, spies, with_bias):
    w8 = int8_weight(50, 96, torch.float32)
    w4 = int4_weight(50, 96, 32, torch.float32)
    x, bias = inputs((2, 3, 96), 50, torch.float32, with_bias)
    assert_matches(w8.matmul(x, bias), x, w8, bias)
    assert_matches(w4.matmul(x, bias), x, w4, bias)
    assert spies == ["int8_weight_matmul", "int4_weight_matmul"]


def test_torch_backend_keeps_the_old_paths(tq, spies, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    w8 = int8_weight(50, 96, torch.float32)
    w4 = int4_weight(50, 96, 32, torch.float32)
    x, bias = inputs((3, 96), 50, torch.float32, True)
    assert_matches(w8.matmul(x, bias), x, w8, bias)
    torch.testing.assert_close(w4.matmul(x, bias), w4.dense_matmul(x, bias), rtol=0, atol=0)
    assert spies == []
