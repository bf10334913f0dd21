"""The part every vision-language model shares: text goes straight to its language model.

A VLM built on :class:`VisionLanguageModel` builds its vision tower and projector, sets
``self.language_model`` (``vlm.plugin.build_language_model``: whichever plugin claims the nested
text config) and implements ``embed_images``; the base delegates the rest of the model protocol
(``embed_tokens``, ``forward``, ``compute_logits``) to the language model and streams checkpoints
through :func:`~vlm.nn.weights.load_with_language_model`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vlm.nn.forward_batch import ForwardBatch
from vlm.nn.weights import LoadReport, WeightLoader, load_with_language_model


class VisionLanguageModel(nn.Module):
    """Base of a VLM's model class: the model protocol, delegated to ``self.language_model``.

    A subclass sets ``self.language_model`` in its constructor and implements ``embed_images``. For
    :meth:`load_weights` it may override :meth:`own_weight_loader` (how its own tensors, the vision
    tower's and projector's, are renamed, fused or ignored) and :meth:`language_model_name` (which
    checkpoint tensors are the language model's, under what name).
    """

    # an nn.Module that follows vlm.plugin.ModelProtocol (a type cannot say both)
    language_model: Any

    # -- the model protocol: text goes straight to the language model ----------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, batch: ForwardBatch, inputs_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, batch, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Language-model tensors (:meth:`language_model_name`) to the language model's own
        ``load_weights``, the rest to :meth:`own_weight_loader`; one pass, nothing buffered."""
        return load_with_language_model(
            weights, self.own_weight_loader(), self.language_model, self.language_model_name
        )

    def own_weight_loader(self) -> WeightLoader:
        """The loader of this model's own tensors (default: checkpoint names are parameter names)."""
        return WeightLoader(self)

    def language_model_name(self, name: str) -> str | None:
        """The language model's name for a checkpoint tensor, ``None`` for this model's own
        (default: ``language_model.`` + the language model's name)."""
        return name[len("language_model.") :] if name.startswith("language_model.") else None


__all__ = ["VisionLanguageModel"]
