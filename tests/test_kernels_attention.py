"""Attention over the paged KV cache: Triton kernels vs the torch path, the torch path vs a naive
float64 formula, and dispatch.

Without a GPU the Triton kernels run on CPU tensors in triton's interpreter (TRITON_INTERPRET is
set below, before vlm.kernels.triton_attention is first imported; see test_kernels.py). The
interpreter pays a few ms per program instance, so shapes are small and the kernels get small
tiles (16) so that contexts of 17 and 33 tokens span several tiles.
"""

import importlib
import itertools
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlm import kernels as K  # noqa: E402
from vlm.kernels import torch_attention as torch_attn  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
HEADS = [(1, 1), (4, 2), (6, 1)]  # (Hq, Hk): MHA, GQA 2, GQA 6 (group not a power of two)
CONTEXT_LENS = [1, 5, 17, 33]
TILE = dict(block_n=16)  # decode
PREFILL_TILE = dict(block_m=16, block_n=16)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    monkeypatch.delenv("VLM_KERNELS", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def ta():
    """The Triton module, under the interpreter (or on a GPU)."""
    pytest.importorskip("triton")
    module = importlib.import_module("vlm.kernels.triton_attention")
    if not ON_GPU and not module.INTERPRETED:
        pytest.skip("triton kernels were defined before TRITON_INTERPRET=1 was set, and there is no GPU")
    return module


@pytest.fixture
def force_triton(ta, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    return ta


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def make_cache(context_lens, block_size, heads, dim, dtype, spare_blocks=3, poison=None):
    """Caches with random contents and shuffled, non-contiguous block tables (padded with 0).

    poison: a value written to every slot no sequence owns (spare blocks, the tail of each last
    block), to prove the kernels never read them.
    """
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, heads, dim).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, dim).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(context_lens), max(needed) + 1, dtype=torch.int32)  # one spare column
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    i = 0
    for s, (n, length) in enumerate(zip(needed, context_lens)):
        tables[s, :n] = perm[i : i + n]
        for p in range(length):
            used[int(tables[s, p // block_size]) * block_size + p % block_size] = True
        i += n
    if poison is not None:
        for cache in (k_cache, v_cache):
            cache.view(num_blocks * block_size, heads, dim)[~used.to(DEVICE)] = poison
    return k_cache, v_cache, tables.to(DEVICE)


def query_starts(query_lens):
    return torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=DEVICE)


def lens_tensor(lens):
    return torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(DEVICE, dtype)


# --------------------------------------------------------------------------
# KV-cache write
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,dim,heads_per_program", [(1, 16, None), (2, 24, None), (3, 64, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_write_kv_cache_triton(ta, block_size, heads, dim, heads_per_program, dtype):
    num_blocks, T = 5, 11
    k_cache, v_cache = (
        randn(num_blocks, block_size, heads, dim, dtype=dtype),
        randn(num_blocks, block_size, heads, dim, dtype=dtype),
    )
    # k and v as views of a fused projection: token stride != heads * dim.
    kv = randn(T, 2 * heads * dim + 8, dtype=dtype)
    k = kv[:, : heads * dim].view(T, heads, dim)
    v = kv[:, heads * dim : 2 * heads * dim].view(T, heads, dim)
    slots = torch.randperm(num_blocks * block_size)[:T].to(DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    torch_attn.write_kv_cache(k, v, want_k, want_v, slots)
    ta.write_kv_cache(k, v, k_cache, v_cache, slots, heads_per_program=heads_per_program)
    # Exact: the written slots hold k/v, every other slot is untouched.
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_cache_triton_skips_out_of_range_slots(ta):
    k_cache, v_cache = randn(2, 4, 1, 16), randn(2, 4, 1, 16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = randn(3, 1, 16), randn(3, 1, 16)
    ta.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([-1, 5, 8], device=DEVICE))
    flat_k, flat_v = k_cache.view(8, 1, 16), v_cache.view(8, 1, 16)
    assert torch.equal(flat_k[5], k[1]) and torch.equal(flat_v[5], v[1])
    keep = [i for i in range(8) if i != 5]
    assert torch.equal(flat_k[keep], before_k.view(8, 1, 16)[keep])
    assert torch.equal(flat_v[keep], before_v.view(8, 1, 16)[keep])


# --------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("dim", [16, 24, 64])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_decode_triton(ta, block_size, dim, n_q_heads, n_kv_heads, dtype):
    lens = [17, 1, 33, 5]
    k_cache, v_cache, tables = make_cache(lens, block_size, n_kv_heads, dim, dtype)
    q = randn(len(lens), n_q_heads, dim, dtype=dtype)
    args = (q, k_cache, v_cache, tables, lens_tensor(lens), dim**-0.5)
    assert_close(ta.paged_decode_attention(*args, **TILE), torch_attn.paged_decode_attention(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads", HEADS)
def test_paged_decode_triton_split_k_and_other_product(ta, n_q_heads, n_kv_heads, dtype):
    # Flash decoding (3 and 5 slices, some empty for short sequences), with the product path the
    # default does not pick for this group size (dot for MHA, elementwise for GQA).
    lens = [17, 1, 33, 5]
    k_cache, v_cache, tables = make_cache(lens, 4, n_kv_heads, 24, dtype)
    q = randn(len(lens), n_q_heads, 24, dtype=dtype)
    args = (q, k_cache, v_cache, tables, lens_tensor(lens), 0.3)
    want = torch_attn.paged_decode_attention(*args)
    other = n_q_heads == n_kv_heads
    for splits in (3, 5):
        assert_close(ta.paged_decode_attention(*args, **TILE, num_splits=splits, use_dot=other), want)
    assert_close(ta.paged_decode_attention(*args, **TILE, use_dot=other), want)


def test_paged_decode_and_prefill_triton_large_logits(ta):
    # Logits in the hundreds: exp overflows fp32 unless every running max (per tile, per split
    # in the merge) is subtracted first.
    lens, query_lens = [33, 17], [12, 17]
    k_cache, v_cache, tables = make_cache(lens, 4, 1, 16, torch.float32)
    q = randn(2, 2, 16)
    args = (q, k_cache, v_cache, tables, lens_tensor(lens), 40.0)
    want = torch_attn.paged_decode_attention(*args)
    for splits in (1, 3):
        assert_close(ta.paged_decode_attention(*args, **TILE, num_splits=splits), want)
    q = randn(sum(query_lens), 2, 16)
    args = (q, k_cache, v_cache, tables, query_starts(query_lens), lens_tensor(lens), 40.0)
    assert_close(ta.paged_prefill_attention(*args, **PREFILL_TILE), torch_attn.paged_prefill_attention(*args))


def test_paged_decode_triton_never_reads_unowned_slots(ta):
    lens = [6, 17, 3]
    k_cache, v_cache, tables = make_cache(lens, 4, 2, 16, torch.float32, poison=float("nan"))
    q = randn(3, 4, 16)
    clean_k, clean_v = (torch.nan_to_num(c, nan=0.0) for c in (k_cache, v_cache))
    want = torch_attn.paged_decode_attention(q, clean_k, clean_v, tables, lens_tensor(lens), 0.25)
    for splits in (1, 4):
        got = ta.paged_decode_attention(q, k_cache, v_cache, tables, lens_tensor(lens), 0.25, **TILE, num_splits=splits)
        assert_close(got, want)


def test_paged_decode_triton_strided_q_and_bf16(ta):
    lens = [9, 33]
    k_cache, v_cache, tables = make_cache(lens, 16, 2, 24, torch.float32)
    q = randn(2, 8 * 24 + 5)[:, : 4 * 24].view(2, 4, 24)  # a slice of a fused qkv row
    args = (q, k_cache, v_cache, tables, lens_tensor(lens), 0.2)
    assert_close(ta.paged_decode_attention(*args, **TILE), torch_attn.paged_decode_attention(*args))
    # bf16: the dots are upcast to fp32 in-kernel under the interpreter.
    args = (q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, lens_tensor(lens), 0.2)
    assert_close(ta.paged_decode_attention(*args, **TILE), torch_attn.paged_decode_attention(*args))


# --------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("dim", [16, 24, 64])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_prefill_triton_with_cached_prefix(ta, block_size, dim, n_q_heads, n_kv_heads, dtype):
    # Whole prompts (1 of 1, 5 of 5) and chunks continuing a cached prefix (9 of 17, 20 of 33:
    # two query tiles, keys over three).
    lens, query_lens = [1, 17, 5, 33], [1, 9, 5, 20]
    k_cache, v_cache, tables = make_cache(lens, block_size, n_kv_heads, dim, dtype)
    q = randn(sum(query_lens), n_q_heads, dim, dtype=dtype)
    args = (q, k_cache, v_cache, tables, query_starts(query_lens), lens_tensor(lens), dim**-0.5)
    assert_close(ta.paged_prefill_attention(*args, **PREFILL_TILE), torch_attn.paged_prefill_attention(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_prefill_triton_whole_prompts(ta, block_size, n_q_heads, n_kv_heads, dtype):
    lens = [5, 33, 17]
    k_cache, v_cache, tables = make_cache(lens, block_size, n_kv_heads, 24, dtype)
    q = randn(sum(lens), n_q_heads, 24, dtype=dtype)
    args = (q, k_cache, v_cache, tables, query_starts(lens), lens_tensor(lens), 24**-0.5)
    assert_close(ta.paged_prefill_attention(*args, **PREFILL_TILE), torch_attn.paged_prefill_attention(*args))


def test_paged_prefill_triton_never_reads_unowned_slots_strided_q_and_bf16(ta):
    lens, query_lens = [6, 19], [6, 3]
    k_cache, v_cache, tables = make_cache(lens, 4, 1, 24, torch.float32, poison=float("nan"))
    clean_k, clean_v = (torch.nan_to_num(c, nan=0.0) for c in (k_cache, v_cache))
    q = randn(9, 5 * 24 + 3)[:, : 3 * 24].view(9, 3, 24)
    meta = (query_starts(query_lens), lens_tensor(lens), 0.2)
    want = torch_attn.paged_prefill_attention(q, clean_k, clean_v, tables, *meta)
    assert_close(ta.paged_prefill_attention(q, k_cache, v_cache, tables, *meta, **PREFILL_TILE), want)
    bf = [t.bfloat16() for t in (q, clean_k, clean_v)]
    assert_close(
        ta.paged_prefill_attention(*bf, tables, *meta, **PREFILL_TILE),
        torch_attn.paged_prefill_attention(*bf, tables, *meta),
    )


# --------------------------------------------------------------------------
# Through vlm.kernels (dispatch, default tile sizes) and as the engine calls them
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_forced_triton_matches_torch_one_engine_step(force_triton, monkeypatch, dtype):
    # One step as vlm.nn.Attention runs it: write this step's k/v, then decode two sequences and
    # prefill two (one continuing a prefix), with the default (GPU) tile sizes.
    block_size, n_q_heads, n_kv_heads, dim = 4, 4, 2, 16
    lens, query_lens = [7, 2, 13, 6], [1, 1, 5, 6]
    k_cache, v_cache, tables = make_cache(lens, block_size, n_kv_heads, dim, dtype)
    slots = torch.tensor(
        [
            int(tables[s, p // block_size]) * block_size + p % block_size
            for s, (n, qn) in enumerate(zip(lens, query_lens))
            for p in range(n - qn, n)
        ],
        device=DEVICE,
    )
    T = sum(query_lens)
    q, k, v = (
        randn(T, n_q_heads, dim, dtype=dtype),
        randn(T, n_kv_heads, dim, dtype=dtype),
        randn(T, n_kv_heads, dim, dtype=dtype),
    )

    def step():
        kc, vc = k_cache.clone(), v_cache.clone()
        K.write_kv_cache(k, v, kc, vc, slots)
        decode = K.paged_decode_attention(q[:2], kc, vc, tables[:2], lens_tensor(lens[:2]), 0.25)
        prefill = K.paged_prefill_attention(
            q[2:], kc, vc, tables[2:], query_starts(query_lens[2:]), lens_tensor(lens[2:]), 0.25
        )
        return kc, vc, decode, prefill

    got = step()
    monkeypatch.setenv("VLM_KERNELS", "torch")
    want = step()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_close(got[2], want[2])
    assert_close(got[3], want[3])


OPS = {
    "write_kv_cache": lambda: (
        torch.ones(2, 1, 4),
        torch.ones(2, 1, 4),
        torch.ones(1, 4, 1, 4),
        torch.ones(1, 4, 1, 4),
        torch.tensor([0, 1]),
    ),
    "paged_decode_attention": lambda: (
        torch.ones(1, 2, 4),
        torch.ones(1, 4, 1, 4),
        torch.ones(1, 4, 1, 4),
        torch.zeros(1, 1, dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        0.5,
    ),
    "paged_prefill_attention": lambda: (
        torch.ones(3, 2, 4),
        torch.ones(1, 4, 1, 4),
        torch.ones(1, 4, 1, 4),
        torch.zeros(1, 1, dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        0.5,
    ),
}


@pytest.mark.parametrize("op", list(OPS))
def test_attention_ops_dispatch_to_the_selected_backend(ta, monkeypatch, op):
    calls = []
    monkeypatch.setattr(torch_attn, op, lambda *args: calls.append(("torch", args)) or "torch result")
    assert getattr(K, op)(*OPS[op]()) == "torch result"
    monkeypatch.setattr(ta, op, lambda *args: calls.append(("triton", args)) or "triton result")
    monkeypatch.setenv("VLM_KERNELS", "triton")
    assert getattr(K, op)(*OPS[op]()) == "triton result"
    assert [backend for backend, _ in calls] == ["torch", "triton"]
    assert all(len(args) == len(OPS[op]()) for _, args in calls)


def test_nn_attention_uses_the_dispatching_ops():
    from vlm.nn import attention as nn_attention

    for op in OPS:
        assert getattr(nn_attention, op) is getattr(K, op)


def test_triton_attention_rejects_bad_arguments(ta):
    cache = torch.ones(2, 4, 2, 16)
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the cache's Hk=2"):
        ta.paged_decode_attention(torch.ones(1, 3, 16), cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="D=16"):
        ta.paged_decode_attention(torch.ones(1, 2, 8), cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        ta.paged_prefill_attention(
            torch.ones(3, 2, 16).half(), cache, cache, tables, torch.tensor([0, 3], dtype=torch.int32), lens, 1.0
        )
    with pytest.raises(ValueError, match="query_start_loc"):
        ta.paged_prefill_attention(torch.ones(3, 2, 16), cache, cache, tables, torch.tensor([0]), lens, 1.0)
    with pytest.raises(ValueError, match="unit stride"):
        bad = torch.ones(2, 4, 16, 2).transpose(2, 3)  # [2, 4, 2, 16] with head_dim stride 2
        ta.write_kv_cache(torch.ones(1, 2, 16), torch.ones(1, 2, 16), bad, bad, torch.tensor([0]))


# --------------------------------------------------------------------------
# The torch path vs a naive float64 formula
# --------------------------------------------------------------------------


def naive_attention(q, k, v, scale, prefix):
    """softmax(q k^T * scale) v for one sequence in float64; query i sits at position prefix + i
    and sees keys 0..prefix + i. q [t, Hq, D], k, v [L, Hk, D] (the sequence's keys, in order)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * scale
    t, length = q.shape[0], k.shape[0]
    allowed = torch.tensor([[j <= prefix + i for j in range(length)] for i in range(t)])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


def sequence_kv(cache, table, length):
    block_size = cache.shape[1]
    return torch.stack([cache[int(table[p // block_size]), p % block_size] for p in range(length)])


@pytest.mark.parametrize("n_q_heads,n_kv_heads", HEADS)
def test_torch_path_matches_naive_attention(n_q_heads, n_kv_heads):
    block_size, dim, scale = 4, 8, 0.35
    lens, query_lens = [1, 5, 17, 33], [1, 2, 17, 9]
    k_cache, v_cache, tables = make_cache(lens, block_size, n_kv_heads, dim, torch.float32)
    k_cache, v_cache, tables = k_cache.cpu(), v_cache.cpu(), tables.cpu()
    kv = [(sequence_kv(k_cache, tables[s], n), sequence_kv(v_cache, tables[s], n)) for s, n in enumerate(lens)]

    q = torch.randn(len(lens), n_q_heads, dim)
    got = torch_attn.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), scale)
    for s, n in enumerate(lens):
        want = naive_attention(q[s : s + 1], *kv[s], scale, prefix=n - 1)[0]
        torch.testing.assert_close(got[s], want.float(), rtol=1e-5, atol=1e-5)

    q = torch.randn(sum(query_lens), n_q_heads, dim)
    starts = [0, *itertools.accumulate(query_lens)]
    got = torch_attn.paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        tables,
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        scale,
    )
    for s, (n, t) in enumerate(zip(lens, query_lens)):
        want = naive_attention(q[starts[s] : starts[s + 1]], *kv[s], scale, prefix=n - t)
        torch.testing.assert_close(got[starts[s] : starts[s + 1]], want.float(), rtol=1e-5, atol=1e-5)


def test_torch_path_write_then_read_round_trip():
    # write_kv_cache puts token p of a sequence where the block table says position p lives.
    block_size, heads, dim, length = 4, 2, 8, 11
    k_cache, v_cache = torch.zeros(6, block_size, heads, dim), torch.zeros(6, block_size, heads, dim)
    table = torch.tensor([4, 1, 3], dtype=torch.int32)
    k, v = torch.randn(length, heads, dim), torch.randn(length, heads, dim)
    slots = torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in range(length)])
    torch_attn.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(sequence_kv(k_cache, table, length), k)
    assert torch.equal(sequence_kv(v_cache, table, length), v)
    assert k_cache[[0, 2, 5]].abs().sum() == 0 and k_cache[3, length % block_size :].abs().sum() == 0
