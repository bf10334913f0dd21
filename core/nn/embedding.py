"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks.

With quantization (:mod:`vlm.quantization`), the LM head is quantized like the linear layers
(``set_quant_config`` before loading, ``prepare_for_inference`` after): to int8, one scale per
vocabulary row, whatever the scheme (:data:`vlm.quantization.config.LM_HEAD`). Rows never span
ranks, so each rank's quantized shard is exactly its slice of the unsharded quantized head.

A head tied to the embedding shares one table with it. Once the head is quantized, the embedding
reads its rows from the int8 table (dequantizing the few rows a step looks up) and the dense table
is freed, as llama.cpp keeps one quantized ``token_embd`` for both. Keeping a dense copy for the
lookup instead would cost the model's largest matrix again in full precision (Qwen2-0.5B: 545 MB
in fp32 next to the head's 136 MB of codes) for a difference of at most half an int8 step per
embedding value.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from vlm.kernels.cpu_gemm import linear, pack_weight
from vlm.nn.weights import ShapeMismatch, set_weight_loader
from vlm.quantization import QuantConfig, quantize
from vlm.quantization.int8 import Int8Weight, has_cpu_kernel

logger = logging.getLogger("vlm")


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
        # this rank's rows as int8 codes, once a tied head has quantized the shared table
        self.quantized_rows: Int8Weight | None = None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ShapeMismatch((self.num_embeddings, *param.shape[1:]), tuple(loaded.shape))
        rows = loaded[self.start : self.start + self.per_rank]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def _rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized_rows is not None:
            return self.quantized_rows.rows(local_ids, self.weight.dtype)
        return F.embedding(local_ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size() == 1:
            return self._rows(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = self._rows(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.packed_weight: torch.Tensor | None = None
        self.quant_config: QuantConfig | None = None
        self.quantized: Int8Weight | None = None
        # the embedding whose table this head shares; in a tuple so that nn.Module does not
        # register it as a second parent of the embedding
        self._tied: tuple[VocabParallelEmbedding, ...] = ()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self._tied = (embedding,)

    def set_quant_config(self, config: QuantConfig | None, name: str = "") -> None:
        """Quantize this head in ``prepare_for_inference`` as ``config`` says of LM heads
        (:meth:`QuantConfig.lm_head_config`; None: keep it dense). Called by
        ``vlm.quantization.assign_quant_config`` with the model's setting."""
        head_config = None if config is None else config.lm_head_config()
        hidden = self.weight.shape[1]
        if head_config is not None and self.weight.device.type == "cpu" and not has_cpu_kernel(hidden):
            # int8 would dequantize the whole table at every step: slower than the dense head
            logger.info("LM head %s stays dense: torch's int8 CPU kernel does not take %d inputs", name, hidden)
            head_config = None
        self.quant_config = head_config

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        super()._load(param, loaded)
        # an untied head quantizes at once (loading then holds one dense table, not two); a tied
        # one is loaded through the embedding's loader and quantizes in prepare_for_inference
        if self.quant_config is not None and self.quantized is None and not self._tied and not param.is_meta:
            self._quantize()

    def prepare_for_inference(self) -> None:
        if self.quant_config is None:
            # a packed copy even when tied: the embedding lookup still needs the dense rows
            self.packed_weight = pack_weight(self.weight)
        elif self.quantized is None:  # quantized while loading, or by an earlier call
            self._quantize()

    def _quantize(self) -> None:
        assert self.quant_config is not None
        quantized = quantize(self.weight.detach(), self.quant_config, keep_codes=bool(self._tied))
        assert isinstance(quantized, Int8Weight)  # LM heads are quantized to int8 (or W8A8) only
        self.quantized = quantized
        for embedding in self._tied:
            embedding.quantized_rows = quantized
        # keep the parameter (for names and shapes, and the tied embedding's dtype) but free it
        self.weight.data = torch.empty((0, self.weight.shape[1]), dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            local = self.quantized.matmul(hidden_states, None)
        else:
            local = linear(hidden_states, self.weight, None, self.packed_weight)
        logits = all_gather_last_dim(local)
        return logits[..., : self.num_embeddings]
