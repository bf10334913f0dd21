"""Triton attention over the paged KV cache: KV write, decode, prefill.

Same signatures as the torch path in ``attention.py`` (which is the ground truth they are tested
against). Caches are ``[num_blocks, block_size, Hk, D]``; a sequence's position ``p`` lives in
physical block ``block_tables[seq, p // block_size]`` at offset ``p % block_size``.

Kernels
-------
``write_kv_cache``
    Grid ``(T, cdiv(Hk, BLOCK_H))``: a program copies ``BLOCK_H`` heads of one token's k and v to
    its slot. Slots outside ``[0, num_blocks * block_size)`` (e.g. vLLM's ``-1`` padding) are
    skipped instead of written out of bounds; the torch path raises on them.

``paged_decode_attention``
    Grid ``(B, Hk, num_splits)``: a program owns one sequence, one kv head and the whole q-head
    group that shares it (GQA: ``G = Hq / Hk`` heads), so each K/V tile is read once per group.
    It walks its span of the context in ``BLOCK_N``-token tiles, gathering the rows through the
    block table, with an online (running max / running sum) softmax in fp32.
    For ``G > 1`` the group is padded to ``BLOCK_G = max(16, next_pow2(G))`` rows and both
    products are ``tl.dot``s (tensor cores); for ``G == 1`` the products are elementwise
    multiply + sum (a 1-row dot would waste 15/16 of the MMA).
    Split-K (flash decoding): with ``num_splits > 1`` each program covers one slice of the
    context, writes its normalized partial output and log-sum-exp to fp32 scratch, and a second
    kernel (grid ``(B, Hq)``) merges the slices. The split count comes from a heuristic that
    fills the GPU's SMs when ``B * Hk`` is small and contexts are long; 1 under the interpreter.

``paged_prefill_attention``
    Grid ``(num_seqs, cdiv(max_query_len, BLOCK_M), Hq)``, flash-attention style: a program
    owns ``BLOCK_M`` queries of one sequence and one q head; it loops over ``BLOCK_N``-key tiles
    (gathered through the block table) up to the causal limit of its last query row, masks
    ``key_pos <= prefix + query_idx`` (bottom-right aligned: the chunk's queries are the last
    ``q_len`` of the sequence's ``context_len`` tokens), online softmax, ``tl.dot`` for QK^T and PV,
    fp32 accumulator. Programs whose query tile lies past their sequence's chunk do no work.
    Optional mask changes (as in ``torch_attention``): ``query_spans`` ``[T, 2]`` lets a query see
    its bidirectional span ``[start, end)`` (the key loop then runs to the tile's furthest span
    end), and ``sliding_window`` ``W`` hides keys ``<= query - W`` (the loop starts at the tile's
    first visible key). Decode takes ``sliding_window`` too: each split starts no earlier than
    ``context_len - W``.

Block sizes (constexpr; defaults picked for real GPUs, not tuned on one, since none was
available when this was written):
  * decode ``BLOCK_N`` = 64 (32 for head_dim > 128), num_warps 4;
  * prefill ``BLOCK_M`` = ``BLOCK_N`` = 64 (``BLOCK_N`` = 32 and 8 warps for head_dim > 128),
    num_warps 4, num_stages 2;
  * ``BLOCK_D = max(16, next_pow2(head_dim))``: any head dim works (e.g. 24, 80, 96), the
    padding lanes are masked;
  * KV write ``BLOCK_H`` so that a program moves ~4096 elements per tensor.
Tests pass smaller ``block_m`` / ``block_n`` keyword arguments so the interpreter exercises many
tiles on small shapes.

Precision: logits, softmax statistics and the output accumulator are fp32. fp16/bf16 operands go
into ``tl.dot`` as they are (the probabilities are rounded to the V dtype for the PV product, as
every flash-attention kernel does); fp32 operands use ``input_precision="ieee"`` (not TF32), so
fp32 models get fp32 attention. Under the interpreter bf16 dots are wrong, so there bf16 operands
are upcast to fp32 in-kernel (``DOT_FP32``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E), scores are kept in base 2

# Split-K heuristic: a split covers at least this many tokens; at most this many splits.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16
# KV write: elements of one tensor a program moves.
WRITE_ELEMENTS_PER_PROGRAM = 4096


# --------------------------------------------------------------------------
# KV-cache write
# --------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,  # [T] int
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    kc_stride_blk,
    kc_stride_slot,
    kc_stride_h,
    vc_stride_blk,
    vc_stride_slot,
    vc_stride_h,
    num_heads,
    head_dim,
    num_slots,  # num_blocks * block_size
    PAGE: tl.constexpr,  # cache block size (tokens per block)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    # An out-of-range slot masks every head. (Folded into the head bound: the interpreter turns
    # `block_mask & scalar_mask` into an int32 mask that loads and stores then reject.)
    head_limit = tl.where((slot >= 0) & (slot < num_slots), num_heads, 0)
    mask = (heads < head_limit)[:, None] & (d < head_dim)[None, :]

    k = tl.load(k_ptr + t * k_stride_t + heads[:, None] * k_stride_h + d[None, :], mask=mask, other=0.0)
    kc = k_cache_ptr + blk * kc_stride_blk + off * kc_stride_slot + heads[:, None] * kc_stride_h + d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)

    v = tl.load(v_ptr + t * v_stride_t + heads[:, None] * v_stride_h + d[None, :], mask=mask, other=0.0)
    vc = v_cache_ptr + blk * vc_stride_blk + off * vc_stride_slot + heads[:, None] * vc_stride_h + d[None, :]
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# Shared pieces of the attention kernels
# --------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(
    cache_ptr,
    table_row,  # pointer to this sequence's row of block_tables
    pos,  # [BLOCK_N] token positions
    pos_mask,  # [BLOCK_N]
    d,  # [BLOCK_D]
    d_mask,
    kv_head,
    stride_blk,
    stride_slot,
    stride_h,
    max_blocks,
    PAGE: tl.constexpr,
):
    """Gather the cache rows of positions ``pos`` of one kv head: [BLOCK_N, BLOCK_D], 0 where masked."""
    logical = pos // PAGE
    # The table read is masked too: a position beyond the table (a context_len the table cannot
    # hold) reads block 0 instead of memory past the table.
    blk = tl.load(table_row + logical, mask=pos_mask & (logical < max_blocks), other=0).to(tl.int64)
    off = (pos % PAGE).to(tl.int64)
    ptrs = cache_ptr + blk[:, None] * stride_blk + off[:, None] * stride_slot + kv_head * stride_h + d[None, :]
    return tl.load(ptrs, mask=pos_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)  # fp16/bf16 operands: tensor cores, fp32 accumulator


# --------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, Hq, D], unit stride along D
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # SPLIT: fp32 [B, Hq, S, D] partials; else [B, Hq, D] in q's dtype
    lse_ptr,  # SPLIT: fp32 [B, Hq, S] log2-sum-exp2 of each slice; else unused
    scale_log2,  # softmax scale * log2(e)
    q_stride_b,
    q_stride_h,
    kc_stride_blk,
    kc_stride_slot,
    kc_stride_h,
    vc_stride_blk,
    vc_stride_slot,
    vc_stride_h,
    bt_stride_b,
    o_stride_b,
    o_stride_h,
    o_stride_s,
    lse_stride_b,
    lse_stride_h,
    head_dim,
    group_size,  # Hq // Hk
    max_blocks,
    split_len,  # tokens per split (a multiple of BLOCK_N)
    window,  # sliding window W (keys >= context_len - W); unused unless HAS_WINDOW
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + b)
    start = split * split_len
    end = tl.minimum(ctx, start + split_len)
    if HAS_WINDOW:
        # the query (position ctx - 1) sees keys > ctx - 1 - W; a split wholly before them is empty
        start = tl.maximum(start, ctx - window)

    g = tl.arange(0, BLOCK_G)
    g_mask = g < group_size
    heads = kv_head * group_size + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    qd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :], mask=qd_mask, other=0.0)
    table_row = block_tables_ptr + b * bt_stride_b

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        k = _load_kv_tile(
            k_cache_ptr,
            table_row,
            pos,
            pos_mask,
            d,
            d_mask,
            kv_head,
            kc_stride_blk,
            kc_stride_slot,
            kc_stride_h,
            max_blocks,
            PAGE,
        )
        v = _load_kv_tile(
            v_cache_ptr,
            table_row,
            pos,
            pos_mask,
            d,
            d_mask,
            kv_head,
            vc_stride_blk,
            vc_stride_slot,
            vc_stride_h,
            max_blocks,
            PAGE,
        )
        if USE_DOT:
            s = _dot(q, tl.trans(k), DOT_FP32)
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(pos_mask[None, :], s * scale_log2, float("-inf"))
        # Every tile holds at least one valid position (n0 < end), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = _dot(p.to(v.dtype), v, DOT_FP32)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # An empty slice (or context_len 0) leaves l_i == 0: output 0 rather than 0/0.
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * o_stride_b + heads[:, None] * o_stride_h + split * o_stride_s + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)
    if SPLIT:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * lse_stride_b + heads * lse_stride_h + split, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    partial_ptr,  # fp32 [B, Hq, S, D] contiguous
    lse_ptr,  # fp32 [B, Hq, S] contiguous
    out_ptr,  # [B, Hq, D] contiguous
    num_splits,
    head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)  # b * Hq + h
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all slices empty: weights become 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    part = tl.load(
        partial_ptr + (row * num_splits + s[:, None]) * head_dim + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# --------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D], unit stride along D
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks]
    query_start_ptr,  # [num_seqs + 1]
    context_lens_ptr,  # [num_seqs]
    out_ptr,  # [T, Hq, D] contiguous
    spans_ptr,  # [T, 2] int32 bidirectional span [start, end) of each query; unused unless HAS_SPANS
    scale_log2,
    q_stride_t,
    q_stride_h,
    kc_stride_blk,
    kc_stride_slot,
    kc_stride_h,
    vc_stride_blk,
    vc_stride_slot,
    vc_stride_h,
    bt_stride_b,
    o_stride_t,
    o_stride_h,
    head_dim,
    group_size,
    max_blocks,
    window,  # sliding window W; unused unless HAS_WINDOW
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_SPANS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // group_size

    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    prefix = ctx - q_len  # cached tokens before this chunk

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    row_mask = rows < q_len
    q_pos = prefix + rows  # each query's position in the sequence
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    qd_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * q_stride_t + head * q_stride_h + d[None, :], mask=qd_mask, other=0.0
    )
    table_row = block_tables_ptr + seq * bt_stride_b

    # Keys up to the last row's position; a tile past the chunk (tile * BLOCK_M >= q_len) loops 0 times.
    hi = prefix + (tile + 1) * BLOCK_M
    if HAS_SPANS:
        # rows past the chunk read an empty span [0, 0)
        span_ptrs = spans_ptr + (q_start + rows) * 2
        span_start = tl.load(span_ptrs, mask=row_mask, other=0)
        span_end = tl.load(span_ptrs + 1, mask=row_mask, other=0)
        hi = tl.maximum(hi, tl.max(span_end, axis=0))  # a span's later keys too
    hi = tl.minimum(hi, ctx)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + tile * BLOCK_M - window + 1, 0)  # the first row's first visible key

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < hi
        k = _load_kv_tile(
            k_cache_ptr,
            table_row,
            pos,
            pos_mask,
            d,
            d_mask,
            kv_head,
            kc_stride_blk,
            kc_stride_slot,
            kc_stride_h,
            max_blocks,
            PAGE,
        )
        v = _load_kv_tile(
            v_cache_ptr,
            table_row,
            pos,
            pos_mask,
            d,
            d_mask,
            kv_head,
            vc_stride_blk,
            vc_stride_slot,
            vc_stride_h,
            max_blocks,
            PAGE,
        )
        s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2
        # Causal, bottom-right aligned; a row also sees its bidirectional span, and with a window
        # only keys > its position - W.
        visible = pos[None, :] <= q_pos[:, None]
        if HAS_SPANS:
            visible = visible | ((pos[None, :] >= span_start[:, None]) & (pos[None, :] < span_end[:, None]))
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        visible = visible & pos_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet (a window's rows past the chunk) keeps m = -inf:
        # shift by 0 instead, so that its weights are 0 rather than NaN.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + (q_start + rows)[:, None] * o_stride_t + head * o_stride_h + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


# Triton picks interpreter or compiler when a kernel is defined; vlm.kernels
# checks this to give a clear error for CPU tensors on a compiled kernel.
INTERPRETED = isinstance(_prefill_kernel, InterpretedFunction)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, what: str) -> tuple[int, int, int]:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{what}: k_cache and v_cache must both be [num_blocks, block_size, Hk, D]; "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        # The caches are written in place / read in place: a copy would be wrong or silently slow.
        raise ValueError(f"{what}: the caches must have unit stride along head_dim")
    return k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]


def _check_q(q: torch.Tensor, k_cache: torch.Tensor, heads: int, dim: int, what: str) -> None:
    if q.dim() != 3 or q.shape[2] != dim:
        raise ValueError(f"{what}: q must be [tokens, Hq, D={dim}], got {tuple(q.shape)}")
    if q.shape[1] % heads != 0:
        raise ValueError(f"{what}: Hq={q.shape[1]} must be a multiple of the cache's Hk={heads}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"{what}: q dtype {q.dtype} != cache dtype {k_cache.dtype}")


def _check_window(sliding_window: int | None, what: str) -> int:
    """The window as a kernel argument (0 when there is none)."""
    if sliding_window is None:
        return 0
    if sliding_window < 1:
        raise ValueError(f"{what}: sliding_window must be at least 1 token, got {sliding_window}")
    return int(sliding_window)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 operands take the fp32 dot; bf16 dots are wrong in the interpreter, so upcast there.
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    heads_per_program: int | None = None,
) -> None:
    """Triton version of ``attention.write_kv_cache`` (in place). ``heads_per_program`` (a power
    of two) is for tests: fewer heads than Hk exercises the head-block masking."""
    block_size, heads, dim = _check_cache(k_cache, v_cache, "write_kv_cache")
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (heads, dim):
        raise ValueError(
            f"write_kv_cache: k and v must both be [T, Hk={heads}, D={dim}]; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv_cache: slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    T = k.shape[0]
    if T == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    slot_mapping = slot_mapping.contiguous()
    block_d = triton.next_power_of_2(dim)
    block_h = heads_per_program or min(triton.next_power_of_2(heads), max(1, WRITE_ELEMENTS_PER_PROGRAM // block_d))
    grid = (T, triton.cdiv(heads, block_h))
    _write_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        heads,
        dim,
        k_cache.shape[0] * block_size,
        PAGE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )


def _num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding split count: enough (batch, kv head, split) programs to cover the SMs about
    twice, each split at least MIN_TOKENS_PER_SPLIT tokens. 1 off-GPU (the interpreter pays per
    program, and a CPU has nothing to fill)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * kv_heads
    if programs >= sms:
        return 1
    by_length = max(1, max_len // max(MIN_TOKENS_PER_SPLIT, block_n))
    return max(1, min(MAX_SPLITS, by_length, triton.cdiv(2 * sms, programs)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
    use_dot: bool | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton version of ``attention.paged_decode_attention``: q ``[B, Hq, D]`` -> ``[B, Hq, D]``;
    ``sliding_window`` as there.

    Keyword-only knobs (tests, tuning): ``block_n`` tokens per K/V tile (power of two, >= 16 when
    the dot path is used); ``num_splits`` context slices (flash decoding; default by heuristic);
    ``use_dot`` forces the tl.dot (True) or elementwise (False) products (default: dot iff Hq > Hk).
    """
    block_size, heads, dim = _check_cache(k_cache, v_cache, "paged_decode_attention")
    _check_q(q, k_cache, heads, dim, "paged_decode_attention")
    B, n_q_heads, _ = q.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(
            f"paged_decode_attention: need block_tables [B={B}, max_blocks] and context_lens [B]; "
            f"got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens = context_lens.contiguous()

    group = n_q_heads // heads
    use_dot = group > 1 if use_dot is None else use_dot
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    block_d = _block_d(dim)
    block_n = block_n or (64 if dim <= 128 else 32)
    max_blocks = block_tables.shape[1]
    # Upper bound on the context (no device sync): what the block table can hold.
    max_len = max_blocks * block_size
    splits = num_splits or _num_splits(B, heads, max_len, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = max(1, triton.cdiv(max_len, split_len))

    common = dict(
        PAGE=block_size,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
        DOT_FP32=_dot_fp32(q.dtype),
        HAS_WINDOW=sliding_window is not None,
        num_warps=4,
    )
    window = _check_window(sliding_window, "paged_decode_attention")
    strides = (
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
    )
    scale_log2 = float(scale) * LOG2E
    if splits == 1:
        _decode_kernel[(B, heads, 1)](
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            out,
            out,
            scale_log2,
            *strides,
            out.stride(0),
            out.stride(1),
            0,
            0,
            0,
            dim,
            group,
            max_blocks,
            split_len,
            window,
            SPLIT=False,
            **common,
        )
        return out

    partial = torch.empty((B, n_q_heads, splits, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, n_q_heads, splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(B, heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        partial,
        lse,
        scale_log2,
        *strides,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        dim,
        group,
        max_blocks,
        split_len,
        window,
        SPLIT=True,
        **common,
    )
    _decode_merge_kernel[(B, n_q_heads)](
        partial,
        lse,
        out,
        splits,
        dim,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_D=triton.next_power_of_2(dim),
        num_warps=1,
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    query_spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``attention.paged_prefill_attention``: q ``[T, Hq, D]`` -> ``[T, Hq, D]``;
    ``sliding_window`` and ``query_spans`` ``[T, 2]`` as there.

    ``block_m`` / ``block_n`` (powers of two, >= 16) are the query and key tile sizes.
    One device-to-host sync: the longest query chunk sizes the grid.
    """
    block_size, heads, dim = _check_cache(k_cache, v_cache, "paged_prefill_attention")
    _check_q(q, k_cache, heads, dim, "paged_prefill_attention")
    num_seqs = context_lens.shape[0]
    if (
        context_lens.dim() != 1
        or query_start_loc.shape != (num_seqs + 1,)
        or block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
    ):
        raise ValueError(
            "paged_prefill_attention: need block_tables [S, max_blocks], query_start_loc [S + 1], "
            f"context_lens [S]; got {tuple(block_tables.shape)}, {tuple(query_start_loc.shape)}, "
            f"{tuple(context_lens.shape)}"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    query_start_loc, context_lens = query_start_loc.contiguous(), context_lens.contiguous()

    window = _check_window(sliding_window, "paged_prefill_attention")
    if query_spans is not None:
        if query_spans.shape != (q.shape[0], 2):
            raise ValueError(
                f"paged_prefill_attention: query_spans must be [T={q.shape[0]}, 2], got {tuple(query_spans.shape)}"
            )
        query_spans = query_spans.to(device=q.device, dtype=torch.int32).contiguous()
    max_q_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_d = _block_d(dim)
    big_head = dim > 128
    block_m = block_m or 64
    block_n = block_n or (32 if big_head else 64)
    grid = (num_seqs, triton.cdiv(max_q_len, block_m), q.shape[1])
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        query_spans if query_spans is not None else out,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        dim,
        q.shape[1] // heads,
        block_tables.shape[1],
        window,
        PAGE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_FP32=_dot_fp32(q.dtype),
        HAS_SPANS=query_spans is not None,
        HAS_WINDOW=sliding_window is not None,
        num_warps=8 if big_head else 4,
        num_stages=2,
    )
    return out


__all__ = ["write_kv_cache", "paged_decode_attention", "paged_prefill_attention", "INTERPRETED"]
