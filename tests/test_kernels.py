"""Tests for vlm.kernels: Triton kernels vs the torch reference, the reference
vs independent formulas, and backend dispatch.

Without a GPU the Triton kernels run on CPU tensors in triton's interpreter.
Triton decides between interpreter and compiler when a ``@triton.jit`` kernel
is *defined*, i.e. when ``vlm.kernels.triton_*`` is first imported. vlm.kernels
imports those modules lazily (on the first call that takes the Triton path),
so setting TRITON_INTERPRET at the top of this file is enough even if another
test module imported vlm.kernels first. With a GPU and TRITON_INTERPRET unset,
the same tests run the compiled kernels on CUDA tensors.

The interpreter costs a few ms per program instance, hence the small shapes.
"""

import importlib
import os
import subprocess
import sys
import types

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlm import kernels as K  # noqa: E402
from vlm.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
EPS = 1e-6
# The interpreter converts to bf16 by truncation, so bf16 results are an ulp
# off there; fp16 is exact and covers the low-precision paths.
DTYPES = [torch.float32, torch.float16]
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}

# numpy warns when the interpreter's exp overflows in the saturated tails of
# sigmoid / gelu_tanh; inf is the intended value there.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    # An ambient VLM_KERNELS must not change what these tests exercise.
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    torch.manual_seed(0)


def triton_module(name):
    pytest.importorskip("triton")
    module = importlib.import_module(f"vlm.kernels.{name}")
    if not ON_GPU and not module.INTERPRETED:
        pytest.skip("triton kernels were defined before TRITON_INTERPRET=1 was set, and there is no GPU")
    return module


@pytest.fixture
def force_triton(monkeypatch):
    for name in ("triton_norm", "triton_activation", "triton_rotary"):
        triton_module(name)
    monkeypatch.setenv("VLM_KERNELS", "triton")


# --------------------------------------------------------------------------
# RMSNorm: Triton vs reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 17, 130, 257])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_rms_norm_triton(force_triton, rows, hidden, dtype):
    x, w = randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    assert_close(K.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 17, 130, 257])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_fused_add_rms_norm_triton(force_triton, rows, hidden, dtype):
    x, res, w = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    x0, res0 = x.clone(), res.clone()
    out, new_res = K.fused_add_rms_norm(x, res, w, EPS)
    ref_out, ref_res = ref.fused_add_rms_norm(x, res, w, EPS)
    assert_close(out, ref_out)
    assert_close(new_res, ref_res)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,block", [(130, 32), (257, 64), (64, 64)])
def test_rms_norm_triton_chunked(hidden, block, dtype):
    # A block narrower than the row takes the two-pass loop that real models
    # only hit above MAX_BLOCK.
    tn = triton_module("triton_norm")
    x, res, w = randn(3, hidden, dtype=dtype), randn(3, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    assert_close(tn.rms_norm(x, w, EPS, block_size=block), ref.rms_norm(x, w, EPS))
    out, new_res = tn.fused_add_rms_norm(x, res, w, EPS, block_size=block)
    ref_out, ref_res = ref.fused_add_rms_norm(x, res, w, EPS)
    assert_close(out, ref_out)
    assert_close(new_res, ref_res)


def test_rms_norm_triton_strided_inputs(force_triton):
    H = 17
    w = randn(H)
    cases = {
        "row-strided view": randn(5, 2 * H)[:, :H],
        "non-mergeable leading dims": randn(4, 3, H)[::2],
        "non-unit last stride": randn(H, 2, 3).permute(1, 2, 0),
    }
    for x in cases.values():
        assert_close(K.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
        res = randn(*x.shape)
        for got, want in zip(K.fused_add_rms_norm(x, res, w, EPS), ref.fused_add_rms_norm(x, res, w, EPS)):
            assert_close(got, want)


def test_rms_norm_triton_empty(force_triton):
    x, w = randn(0, 8), randn(8)
    assert K.rms_norm(x, w, EPS).shape == (0, 8)


# --------------------------------------------------------------------------
# Gated activations: Triton vs reference
# --------------------------------------------------------------------------

ACTIVATIONS = {
    "silu": (lambda m, x: m.silu_and_mul(x), lambda x: ref.silu_and_mul(x)),
    "gelu": (lambda m, x: m.gelu_and_mul(x), lambda x: ref.gelu_and_mul(x)),
    "gelu_tanh": (lambda m, x: m.gelu_and_mul(x, "tanh"), lambda x: ref.gelu_and_mul(x, "tanh")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 17, 130, 257])
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gated_activation_triton(force_triton, act, rows, d, dtype):
    ours, theirs = ACTIVATIONS[act]
    x = randn(rows, 2 * d, dtype=dtype, scale=3.0)
    assert_close(ours(K, x), theirs(x))


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gated_activation_triton_multi_block_and_strided(act):
    ta = triton_module("triton_activation")
    ours, theirs = ACTIVATIONS[act]
    x = randn(2, 3, 2 * 130)[:, ::2]  # 3-D, non-contiguous leading dims
    fn = getattr(ta, "silu_and_mul" if act == "silu" else "gelu_and_mul")
    kwargs = {} if act == "silu" else {"approximate": "tanh" if act == "gelu_tanh" else "none"}
    assert_close(fn(x, **kwargs, block_size=32), theirs(x))


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gated_activation_triton_saturates(force_triton, act):
    ours, theirs = ACTIVATIONS[act]
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    x = torch.cat([gate, torch.full_like(gate, 2.0)])[None].to(DEVICE)
    got = ours(K, x)
    assert torch.isfinite(got).all()
    assert_close(got, theirs(x))


# --------------------------------------------------------------------------
# Rotary: Triton vs reference
# --------------------------------------------------------------------------


def make_cos_sin(positions, rotary_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_frac", [1.0, 0.5])
@pytest.mark.parametrize("head_dim", [8, 24, 64])
@pytest.mark.parametrize("n_q_heads,n_k_heads", [(1, 1), (3, 1), (4, 2)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_apply_rotary_triton(force_triton, tokens, n_q_heads, n_k_heads, head_dim, rotary_frac, dtype, is_neox):
    q = randn(tokens, n_q_heads, head_dim, dtype=dtype)
    k = randn(tokens, n_k_heads, head_dim, dtype=dtype)
    cos, sin = make_cos_sin(torch.arange(tokens) * 37 + 3, int(head_dim * rotary_frac))
    q_out, k_out = K.apply_rotary(q, k, cos, sin, is_neox)
    q_ref, k_ref = ref.apply_rotary(q, k, cos, sin, is_neox)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_apply_rotary_triton_qkv_views_and_head_blocks(is_neox):
    # q and k as slices of a fused qkv projection (token stride != H * D),
    # with 2 heads per program so the last head block is partly masked for q
    # and entirely masked for k.
    tr = triton_module("triton_rotary")
    T, Hq, Hk, D = 4, 3, 1, 24
    qkv = randn(T, (Hq + 2 * Hk) * D)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    cos, sin = make_cos_sin(torch.arange(T), 12)
    qkv0 = qkv.clone()
    got = tr.apply_rotary(q, k, cos, sin, is_neox, heads_per_program=2)
    want = ref.apply_rotary(q, k, cos, sin, is_neox)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert torch.equal(qkv, qkv0), "inputs must not be modified"


def make_tables(max_position, rotary_dim, base=10000.0):
    return make_cos_sin(torch.arange(max_position), rotary_dim, base)


def mrope_positions(tokens, max_position):
    # text-like columns (three equal rows) and image-like columns (t fixed, h/w varying)
    positions = torch.randint(0, max_position, (3, tokens))
    positions[:, ::3] = positions[0, ::3]
    return positions.to(DEVICE)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim,mrope_section",
    [(16, [2, 3, 3]), (24, [4, 4, 4]), (32, [2, 2, 2]), (64, [8, 12, 12])],
    ids=["d16", "d24", "d32-partial", "d64"],
)
@pytest.mark.parametrize("n_q_heads,n_k_heads", [(1, 1), (4, 2)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_apply_mrope_triton(force_triton, tokens, n_q_heads, n_k_heads, head_dim, mrope_section, dtype, is_neox):
    rotary_dim = 2 * sum(mrope_section)
    q = randn(tokens, n_q_heads, head_dim, dtype=dtype)
    k = randn(tokens, n_k_heads, head_dim, dtype=dtype)
    cos_table, sin_table = make_tables(50, rotary_dim)
    positions = mrope_positions(tokens, 50)
    rows = ref.mrope_section_rows(mrope_section, DEVICE)
    got = K.apply_mrope(q, k, cos_table, sin_table, positions, rows, is_neox)
    want = ref.apply_mrope(q, k, cos_table, sin_table, positions, rows, is_neox)
    for g, w in zip(got, want):
        assert_close(g, w)


def test_apply_mrope_triton_qkv_views_and_head_blocks():
    tr = triton_module("triton_rotary")
    T, Hq, Hk, D = 5, 3, 1, 16
    qkv = randn(T, (Hq + 2 * Hk) * D)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    cos_table, sin_table = make_tables(20, 16)
    positions = mrope_positions(T, 20)
    rows = ref.mrope_section_rows([2, 3, 3], DEVICE)
    qkv0 = qkv.clone()
    got = tr.apply_mrope(q, k, cos_table, sin_table, positions, rows, heads_per_program=2)
    want = ref.apply_mrope(q, k, cos_table, sin_table, positions, rows)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert torch.equal(qkv, qkv0), "inputs must not be modified"


def test_apply_mrope_rejects_sections_that_do_not_cover_the_frequencies():
    q = k = torch.zeros(2, 1, 16)
    cos_table, sin_table = make_cos_sin(torch.arange(4), 16)
    with pytest.raises(ValueError, match="mrope_section must sum"):
        ref.apply_mrope(
            q,
            k,
            cos_table.cpu(),
            sin_table.cpu(),
            torch.zeros(3, 2, dtype=torch.long),
            ref.mrope_section_rows([2, 2, 2]),
        )


def test_reference_mrope_matches_transformers_qwen2_vl():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

    section = [4, 6, 6]
    config = Qwen2VLTextConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_scaling={"type": "mrope", "mrope_section": section, "rope_theta": 10000.0},
    )
    rotary = hf.Qwen2VLRotaryEmbedding(config)
    T, D = 9, 32
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    positions = mrope_positions(T, 64).cpu()
    cos, sin = rotary(q, positions[:, None, :])  # [3, 1, T, D]
    q_hf, k_hf = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_table, sin_table = make_cos_sin(torch.arange(64), D)
    got_q, got_k = ref.apply_mrope(q, k, cos_table.cpu(), sin_table.cpu(), positions, ref.mrope_section_rows(section))
    torch.testing.assert_close(got_q, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Reference vs independent formulas
# --------------------------------------------------------------------------


def test_reference_rms_norm_formula():
    x, w = torch.randn(3, 5, 33), torch.randn(33)
    x64 = x.double()
    want = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / 33 + EPS) * w.double()
    torch.testing.assert_close(ref.rms_norm(x, w, EPS), want.float())


def test_reference_rms_norm_matches_hf_llama_rounding():
    # HF LlamaRMSNorm: normalize in fp32, cast to the input dtype, then weight.
    x, w = torch.randn(4, 64).half(), torch.randn(64).half()
    h = x.float()
    hf = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).half()
    assert torch.equal(ref.rms_norm(x, w, EPS), hf)


def test_reference_fused_add_rms_norm():
    x, res, w = torch.randn(3, 16).half(), torch.randn(3, 16).half(), torch.randn(16).half()
    x0, res0 = x.clone(), res.clone()
    out, new_res = ref.fused_add_rms_norm(x, res, w, EPS)
    assert torch.equal(new_res, x + res)
    assert torch.equal(out, ref.rms_norm(x + res, w, EPS))
    assert torch.equal(x, x0) and torch.equal(res, res0)


def test_reference_gated_activations_formulas():
    x = torch.randn(4, 2 * 10, dtype=torch.float64)
    gate, up = x[:, :10], x[:, 10:]
    torch.testing.assert_close(ref.silu_and_mul(x), F.silu(gate) * up)
    torch.testing.assert_close(ref.silu_and_mul(x), gate / (1 + torch.exp(-gate)) * up)
    torch.testing.assert_close(ref.gelu_and_mul(x), 0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * up)
    tanh_gelu = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)))
    torch.testing.assert_close(ref.gelu_and_mul(x, "tanh"), tanh_gelu * up)


def _hf_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_reference_rotary_neox_matches_hf_rotate_half(rotary_dim):
    T, H, D = 6, 2, 32
    q, k = torch.randn(T, H, D), torch.randn(T, 1, D)
    cos, sin = make_cos_sin(torch.arange(T), rotary_dim)
    # HF builds cos/sin of width R by repeating the R/2 frequencies.
    cos_hf, sin_hf = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    q_out, k_out = ref.apply_rotary(q, k, cos, sin, is_neox=True)
    for x, out in ((q, q_out), (k, k_out)):
        rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
        want = torch.cat([rot * cos_hf + _hf_rotate_half(rot) * sin_hf, tail], -1)
        torch.testing.assert_close(out, want)


def test_reference_rotary_is_complex_multiplication():
    # Each pair (a, b) is the complex number a + ib, rotated by e^{i * angle}:
    # interleaved pairs for GPT-J (Meta's view_as_complex), halves for neox.
    T, H, D = 5, 3, 16
    positions = torch.arange(T) * 11
    cos, sin = make_cos_sin(positions, D)
    rotation = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None, :]
    x = torch.randn(T, H, D)

    gptj, _ = ref.apply_rotary(x, x[:, :1], cos, sin, is_neox=False)
    want = torch.view_as_real(torch.view_as_complex(x.reshape(T, H, D // 2, 2)) * rotation).flatten(-2)
    torch.testing.assert_close(gptj, want)

    neox, _ = ref.apply_rotary(x, x[:, :1], cos, sin, is_neox=True)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * rotation
    torch.testing.assert_close(neox, torch.cat([z.real, z.imag], -1))


@pytest.mark.parametrize("is_neox", [True, False])
def test_reference_rotary_depends_only_on_relative_position(is_neox):
    # The property RoPE exists for: <rot(q, m), rot(k, n)> is a function of m - n.
    D = 16
    q, k = torch.randn(1, 1, D, dtype=torch.float64), torch.randn(1, 1, D, dtype=torch.float64)

    def score(m, n):
        cq, sq = make_cos_sin(torch.tensor([m]), D)
        ck, sk = make_cos_sin(torch.tensor([n]), D)
        rq, _ = ref.apply_rotary(q, k, cq.double(), sq.double(), is_neox)
        _, rk = ref.apply_rotary(q, k, ck.double(), sk.double(), is_neox)
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5, abs=1e-5)
    assert score(7, 3) != pytest.approx(score(8, 3), rel=1e-3)


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        ref.rms_norm(torch.randn(2, 8), torch.randn(7), EPS)
    with pytest.raises(ValueError, match="even"):
        ref.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="approximate"):
        ref.gelu_and_mul(torch.randn(2, 8), "fast")
    with pytest.raises(ValueError, match="rotary dim"):
        cos = torch.randn(3, 5)
        ref.apply_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), cos, cos)


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def test_cpu_tensors_use_torch_by_default():
    assert K.backend_for(torch.ones(1)) == "torch"


@pytest.mark.parametrize(
    "value,expected", [("torch", "torch"), ("triton", "triton"), (" Triton ", "triton"), ("auto", "torch")]
)
def test_env_var_forces_backend(monkeypatch, value, expected):
    monkeypatch.setenv("VLM_KERNELS", value)
    assert K.backend_for(torch.ones(1)) == expected


def test_auto_uses_triton_for_cuda_tensors_when_installed(monkeypatch):
    from vlm import platform

    fake_cuda_tensor = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(platform, "triton_installed", lambda: True)
    assert K.backend_for(fake_cuda_tensor) == "triton"
    monkeypatch.setattr(platform, "triton_installed", lambda: False)
    assert K.backend_for(fake_cuda_tensor) == "torch"


def test_invalid_env_var_raises(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"VLM_KERNELS='cuda'.*auto, torch, triton"):
        K.backend_for(torch.ones(1))
    with pytest.raises(ValueError, match="VLM_KERNELS"):
        K.rms_norm(torch.ones(2, 4), torch.ones(4), EPS)


OPS = {
    "rms_norm": ("triton_norm", lambda: (torch.ones(2, 4), torch.ones(4), EPS)),
    "fused_add_rms_norm": ("triton_norm", lambda: (torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), EPS)),
    "silu_and_mul": ("triton_activation", lambda: (torch.ones(2, 4),)),
    "gelu_and_mul": ("triton_activation", lambda: (torch.ones(2, 4), "tanh")),
    "apply_rotary": (
        "triton_rotary",
        lambda: (torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.ones(2, 2), torch.ones(2, 2), False),
    ),
}


@pytest.mark.parametrize("op", list(OPS))
def test_ops_dispatch_to_the_selected_backend(monkeypatch, op):
    module_name, make_args = OPS[op]
    calls = []
    monkeypatch.setattr(ref, op, lambda *args: calls.append(("torch", args)) or "torch result")
    assert getattr(K, op)(*make_args()) == "torch result"

    module = triton_module(module_name)
    monkeypatch.setattr(module, op, lambda *args: calls.append(("triton", args)) or "triton result")
    monkeypatch.setenv("VLM_KERNELS", "triton")
    assert getattr(K, op)(*make_args()) == "triton result"
    # Every argument, including optional ones, is passed through.
    assert [backend for backend, _ in calls] == ["torch", "triton"]
    assert len(calls[1][1]) == len(make_args())


def test_forced_triton_without_triton_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.delitem(sys.modules, "vlm.kernels.triton_norm", raising=False)
    monkeypatch.setenv("VLM_KERNELS", "triton")
    with pytest.raises(ImportError, match="triton is not importable.*VLM_KERNELS=torch"):
        K.rms_norm(torch.ones(2, 4), torch.ones(4), EPS)


def test_forced_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    tn = triton_module("triton_norm")
    monkeypatch.setattr(tn, "INTERPRETED", False)
    monkeypatch.setenv("VLM_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.rms_norm(torch.ones(2, 4), torch.ones(4), EPS)


def test_import_and_torch_path_do_not_import_triton():
    # A fresh interpreter: this process has long since imported triton.
    code = (
        "import sys, torch, vlm.kernels as K\n"
        "K.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)\n"
        "K.apply_rotary(torch.ones(1, 1, 4), torch.ones(1, 1, 4), torch.ones(1, 2), torch.ones(1, 2))\n"
        "loaded = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'vlm.kernels.triton')))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("VLM_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
