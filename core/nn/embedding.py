"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from vlm.kernels.cpu_gemm import linear, pack_weight
from vlm.nn.weights import ShapeMismatch, set_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__()
        world = tp_world_size()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // world)  # ceil: the last shard may be padded
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(
            torch.empty(self.per_rank, embedding_dim, dtype=dtype, device=device), requires_grad=False
        )
        set_weight_loader(self.weight, self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ShapeMismatch((self.num_embeddings, *param.shape[1:]), tuple(loaded.shape))
        rows = loaded[self.start : self.start + self.per_rank]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.packed_weight: torch.Tensor | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def prepare_for_inference(self) -> None:
        # a packed copy even when tied: the embedding lookup still needs the dense rows
        self.packed_weight = pack_weight(self.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(linear(hidden_states, self.weight, None, self.packed_weight))
        return logits[..., : self.num_embeddings]
