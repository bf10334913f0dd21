"""Attention over the paged KV cache: torch implementations (the CPU path).

Decode batches all one-token sequences into a single SDPA call over their gathered context;
prefill runs one SDPA per sequence, causal, continuing a cached prefix when there is one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new ``k, v`` ``[T, Hk, D]`` at flat ``slot_mapping`` ``[T]`` of the paged caches."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q ``[B, Hq, D]``; ``slots`` ``[B, L]`` cache slots of each context; ``mask`` ``[B, 1, 1, L]``."""
    heads, dim = k_cache.shape[-2:]
    k = k_cache.view(-1, heads, dim)[slots].transpose(1, 2)  # [B, Hk, L, D]
    v = v_cache.view(-1, heads, dim)[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != heads
    )
    return out.squeeze(2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q`` ``[t, Hq, D]`` over ``k, v`` ``[L, Hk, D]`` whose last t are q's.

    With ``L > t`` the first ``L - t`` keys are a cached prefix every query sees.
    """
    t, length = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    gqa = qh.shape[0] != kh.shape[0]
    if t == length:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # SDPA's is_causal aligns the triangle top-left; a continued prefix needs it bottom-right
        rows = torch.arange(t, device=q.device).unsqueeze(1) + (length - t)
        mask = torch.arange(length, device=q.device).unsqueeze(0) <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)
