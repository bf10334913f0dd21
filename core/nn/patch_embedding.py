"""A vision tower's patch embedding: a convolution whose kernel equals its stride, held as one GEMM.

Such a convolution maps every non-overlapping patch linearly, so it is a linear layer over the
flattened patches: it runs through ``vlm.nn``'s packed GEMM and loads the checkpoint's conv
weight (``[hidden, C, (T,) P, P]``) reshaped. Registered as ``ConvPatchEmbedding`` in
``vlm.registry.PATCH_EMBEDDINGS``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.nn.linear import ReplicatedLinear
from vlm.nn.weights import ShapeMismatch, set_weight_loader


class ConvPatchEmbedding(ReplicatedLinear):
    """``Conv2d(in_channels, hidden, P, stride=P)`` (or a ``Conv3d`` with kernel ``(T, P, P)``) as a linear layer.

    :param patch_size: ``P``, or ``(T, P, P)`` for video-style patches (Qwen2-VL).
    :return: from ``forward``, ``[B, H/P * W/P, hidden]`` for ``[B, C, H, W]`` pixels (patches in
        row-major order, as ``conv(x).flatten(2).transpose(1, 2)``), or ``[N, hidden]`` for patches
        already flattened to ``[N, C * T * P * P]`` (Qwen2-VL's preprocessor does that).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        patch_size: int | tuple[int, ...],
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        kernel = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        super().__init__(in_channels * math.prod(kernel), hidden_size, bias=bias, dtype=dtype, device=device)
        self.in_channels, self.kernel = in_channels, kernel
        self.conv_shape = (hidden_size, in_channels, *kernel)
        set_weight_loader(self.weight, self._load_conv_weight)

    def _load_conv_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != self.conv_shape:
            raise ShapeMismatch(self.conv_shape, tuple(loaded.shape))
        param.data.copy_(loaded.reshape(param.shape))

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Patches per column and per row of ``[B, C, H, W]`` pixels."""
        return pixel_values.shape[-2] // self.kernel[-2], pixel_values.shape[-1] // self.kernel[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype  # kept when the dense weight is dropped for the packed one
        if x.dim() == 2:  # already [N, C * T * P * P]
            return self.matmul(x.to(dtype), self.bias)
        batch, channels, height, width = x.shape
        p_h, p_w = self.kernel[-2], self.kernel[-1]
        rows, cols = height // p_h, width // p_w
        patches = (
            x[:, :, : rows * p_h, : cols * p_w]
            .reshape(batch, channels, rows, p_h, cols, p_w)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, rows * cols, channels * p_h * p_w)
        )
        return self.matmul(patches.to(dtype), self.bias)
