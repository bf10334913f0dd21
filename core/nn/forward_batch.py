"""What a model's forward sees besides token ids: where each sequence's tokens are, and its KV cache.

The batch is *flat*: the new tokens of every scheduled sequence are concatenated into one
``[T]`` tensor, decode sequences (one new token each) first, then prefill chunks. The KV cache is
paged: each layer owns ``k_cache, v_cache`` of shape ``[num_blocks, block_size, kv_heads, head_dim]``
and every sequence a block table. Models do not read these fields; ``vlm.nn.Attention`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSpan:
    """Precomputed image features to write over placeholder tokens of one sequence.

    ``embeds`` rows replace the embeddings of the flat-batch token positions ``token_index``.
    """

    token_index: torch.Tensor  # [N] positions in the flat batch
    embeds: torch.Tensor  # [N, hidden]


@dataclass
class ForwardBatch:
    query_lens: list[int]  # new tokens per sequence in this step
    context_lens: list[int]  # tokens in the cache per sequence after this step (prefix + new)
    num_decodes: int  # the first ``num_decodes`` sequences have exactly one new token
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer
    block_size: int
    block_tables: torch.Tensor  # [S, max_blocks] int32: each sequence's cache blocks, in order
    context_lens_tensor: torch.Tensor  # [S] int32, as context_lens
    prefill_query_start: torch.Tensor  # [P + 1] int32: prefill queries' offsets, relative to the first
    images: list[ImageSpan] = field(default_factory=list)
    #: ``[T]`` bool, True at image tokens (``None``: the step has no image tokens). Models that
    #: route tokens by type (CogVLM's visual experts) read it; text-only steps skip the routing.
    image_token_mask: torch.Tensor | None = None
    #: ``[T - num_decodes, 2]`` int32: for each prefill token, the prompt positions ``[start, end)``
    #: of the bidirectional span it belongs to (``start == end``: none), from
    #: ``ModelInputs.bidirectional_spans``; ``None`` when no prefill token of the step is in one.
    #: ``vlm.nn.Attention`` lets such a token see its whole span (Gemma 3 images, PaliGemma's prefix).
    prefill_spans: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
