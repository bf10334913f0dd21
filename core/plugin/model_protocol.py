"""The model protocol: what ``build_model`` must return, and what the engine calls on it.

Nothing checks this at run time (``vlm.testing.conformance`` does in tests); it is here so that
plugin authors and type checkers have one place that states the contract.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from vlm.inputs import ImageInput
    from vlm.nn.forward_batch import ForwardBatch
    from vlm.nn.weights import LoadReport


class ModelProtocol(Protocol):
    #: optional class attribute: 3 for multimodal rope (Qwen2-VL), so the engine passes ``[3, T]``
    #: positions (the preprocessor's ``ModelInputs.positions`` / ``position_delta``); 1 if absent
    position_dims: int

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: ForwardBatch,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for a flat batch of ``T`` new tokens of many sequences.

        ``positions`` is ``[T]`` (or ``[3, T]`` for multimodal rope); ``batch`` carries the paged KV
        cache and where each sequence's tokens are; ``inputs_embeds`` replaces the token embeddings
        when the core has written image features over placeholder tokens.
        """

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` token ids -> ``[T, hidden]`` embeddings."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` float32 logits."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Consume ``(checkpoint name, tensor)`` pairs; report missing / unexpected / mis-shaped ones."""


class VisionModelProtocol(ModelProtocol, Protocol):
    #: optional class attribute for ``vlmrun export --part vision``: the ``ImageInput.extra``
    #: entries (e.g. ``("image_grid_thw",)``) that become int64 graph inputs, one row per picture;
    #: during export ``embed_images`` receives them as tensors and must trace with them
    #: (``torch.compiler.is_exporting()`` tells it so). Default: pixels only.
    vision_export_inputs: tuple[str, ...]

    def embed_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One ``[image.num_tokens, hidden]`` tensor per image, in order (the core merges them)."""


__all__ = ["ModelProtocol", "VisionModelProtocol"]
