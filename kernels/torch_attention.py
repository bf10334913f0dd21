"""Attention over the paged KV cache: the torch implementations (the CPU path).

Caches are ``[num_blocks, block_size, kv_heads, head_dim]`` per layer; a sequence's tokens live
in the blocks its row of ``block_tables`` lists, in order. The Triton kernels in
``triton_attention.py`` take exactly these arguments.

Two optional changes to the causal mask, as transformers' masks compose them (Gemma 3, PaliGemma):

- ``query_spans`` (prefill): ``[T, 2]`` int, per query the positions ``[start, end)`` of the
  bidirectional span it belongs to (``start == end``: none). A query also sees every key of its
  span, later ones included: ``visible = key <= query or start <= key < end``.
- ``sliding_window`` ``W``: a query sees only keys ``key > query - W`` (applied after the span
  rule, as transformers' ``and_mask`` is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new ``k, v`` ``[T, Hk, D]`` at flat slots ``slot_mapping`` ``[T]`` (block * block_size + offset)."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def _slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions ``0..length-1`` for each row of ``block_tables``."""
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables.long().unsqueeze(-1) * block_size + offsets).flatten(1)
    return slots[:, :length]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: q ``[B, Hq, D]`` over each sequence's ``context_lens`` cached tokens
    (the last ``sliding_window`` of them, when given).

    All sequences go through one SDPA call on their gathered, padded contexts.
    """
    block_size, heads, dim = k_cache.shape[1:]
    length = int(context_lens.max())
    slots = _slots(block_tables, length, block_size)
    keys = torch.arange(length, device=q.device)
    visible = keys < context_lens.unsqueeze(1)
    if sliding_window is not None:
        # the query sits at position context_len - 1 and sees keys > query - W
        visible &= keys > (context_lens.unsqueeze(1) - 1 - sliding_window)
    mask = visible[:, None, None, :]
    k = k_cache.view(-1, heads, dim)[slots].transpose(1, 2)  # [B, Hk, L, D]
    v = v_cache.view(-1, heads, dim)[slots].transpose(1, 2)
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # CPU SDPA in half precision is ~8x slower than in fp32 for one query token (measured:
        # 1333 vs 168 us, B=8, 14/2 heads, 200 tokens); decode reads little, so compute in fp32
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != heads
    )
    return out.squeeze(2).to(dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    query_spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for prompt chunks: sequence i owns queries ``q[query_start_loc[i]:query_start_loc[i+1]]``,
    the last of its ``context_lens[i]`` cached tokens (a chunk may continue a cached prefix).

    ``query_spans`` ``[T, 2]`` and ``sliding_window`` change the causal mask (module docstring).
    """
    block_size, heads, dim = k_cache.shape[1:]
    starts = query_start_loc.tolist()
    lengths = context_lens.tolist()
    plain_causal = sliding_window is None and query_spans is None
    out = torch.empty_like(q)
    for i, length in enumerate(lengths):
        start, end = starts[i], starts[i + 1]
        t = end - start
        slots = _slots(block_tables[i : i + 1], length, block_size)[0]
        kh = k_cache.view(-1, heads, dim)[slots].transpose(0, 1)
        vh = v_cache.view(-1, heads, dim)[slots].transpose(0, 1)
        qh = q[start:end].transpose(0, 1)
        gqa = qh.shape[0] != heads
        if t == length and plain_causal:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # SDPA's is_causal aligns the triangle top-left; a continued prefix needs it bottom-right
            rows = torch.arange(t, device=q.device).unsqueeze(1) + (length - t)
            keys = torch.arange(length, device=q.device).unsqueeze(0)
            mask = keys <= rows
            if query_spans is not None:
                span = query_spans[start:end].to(q.device)
                mask |= (keys >= span[:, :1]) & (keys < span[:, 1:])
            if sliding_window is not None:
                mask &= keys > rows - sliding_window
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)
    return out
