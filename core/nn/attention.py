"""Attention: causal over the engine's paged KV cache (language models), and bidirectional
within one image (vision towers).

The layer writes this step's k/v into its cache slots, then attends: decode sequences in one
batched call, prefill sequences one by one (continuing their cached prefix when they have one).
A layer with a ``sliding_window`` sees only the last that many tokens; prompt tokens in a
bidirectional span (``ForwardBatch.prefill_spans``) also see the rest of their span.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.kernels import paged_decode_attention, paged_prefill_attention, write_kv_cache
from vlm.nn.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        layer_idx: int,
        scale: float | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.layer_idx = layer_idx
        self.scale = scale if scale is not None else head_dim**-0.5
        #: keys older than this many tokens are hidden (Mistral, Gemma 3's local layers); None: all
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q ``[T, Hq, D]``, k and v ``[T, Hk, D]`` -> ``[T, Hq * D]``."""
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        nd = batch.num_decodes
        parts = []
        if nd:
            parts.append(
                paged_decode_attention(
                    q[:nd],
                    k_cache,
                    v_cache,
                    batch.block_tables[:nd],
                    batch.context_lens_tensor[:nd],
                    self.scale,
                    sliding_window=self.sliding_window,
                )
            )
        if nd < len(batch.query_lens):
            parts.append(
                paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    batch.block_tables[nd:],
                    batch.prefill_query_start,
                    batch.context_lens_tensor[nd:],
                    self.scale,
                    sliding_window=self.sliding_window,
                    query_spans=batch.prefill_spans,
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)


class VisionAttention(nn.Module):
    """Full (non-causal) attention among the patches of each image; no KV cache.

    Two layouts: a batch of equal-length sequences ``[B, N, H * D]`` (fixed-size tiles), or one
    flat run of sequences of different lengths with ``cu_seqlens`` (images of different sizes
    packed together, attention windows), where each token attends only within its own sequence.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q, k, v ``[B, N, H * D]`` -> ``[B, N, H * D]``.

        With ``cu_seqlens`` (``[S + 1]`` cumulative sequence lengths, starting at 0): q, k, v are
        ``[T, H * D]`` (or ``[T, H, D]``) holding S sequences back to back -> ``[T, H * D]``.
        """
        if cu_seqlens is not None:
            return self._varlen(q, k, v, cu_seqlens)
        b, n, _ = q.shape
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        tokens, heads, dim = q.shape[0], self.num_heads, self.head_dim
        q, k, v = (t.reshape(tokens, heads, dim) for t in (q, k, v))
        bounds = cu_seqlens.tolist()
        # block-diagonal attention without a [T, T] mask: sequences of equal length (windows,
        # same-size images) run as one batch, one attention call per distinct length
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        out = torch.empty_like(q)
        for length, starts in starts_by_length.items():
            offsets = torch.arange(length, device=q.device)
            index = (torch.tensor(starts, device=q.device)[:, None] + offsets).flatten()
            qs, ks, vs = (t[index].view(len(starts), length, heads, dim).transpose(1, 2) for t in (q, k, v))
            attended = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)
            out[index] = attended.transpose(1, 2).reshape(-1, heads, dim)
        return out.reshape(tokens, heads * dim)
