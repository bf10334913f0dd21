"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT + patch merger + Qwen2 from the core.

The vision tower takes every picture at (nearly) its own resolution: the preprocessor cuts it into
14-px patches (``[num_patches, C * T * 14 * 14]``, see ``preprocess.py``) and the tower runs all
patches of all pictures of a step as one flat sequence, attention restricted to each picture
(``cu_seqlens``). Positions are 2-D rotary (a patch's row rotates half of each head's
frequencies, its column the other half). The patch merger then folds each 2 x 2 block of patches
into one token of the language model's width.

Qwen2.5-VL differs in the tower only: RMSNorm instead of LayerNorm, a SwiGLU MLP, and window
attention (each block of ``window_size`` pixels attends within itself) in every block but
``fullatt_block_indexes``. For windows the patches are reordered window by window once before
the blocks and the merged tokens restored to raster order after the merger.

Module names follow the checkpoints (``visual.blocks.N.attn.qkv``, ``visual.merger.mlp.0``, ...);
the language model (``model.*``, ``lm_head``) is vlm-plugin-llama's Qwen2, which applies
M-RoPE from ``mrope_section`` when the engine passes ``[3, T]`` positions (``position_dims``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.nn import (
    GeluAndMul,
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    VisionAttention,
    VisionLanguageModel,
    WeightLoader,
    WeightMapping,
    apply_rotary,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_replicated_linear,
    build_rowwise_linear,
    get_act_fn,
)
from vlm.plugin import PATCH_EMBEDDINGS, VISION_TOWERS, ConfigError, build_language_model, composite_text_config

Grid = tuple[int, int, int]  # (t, h, w) in patches


class VisionSettings:
    """The vision fields of both configs, under one set of names."""

    def __init__(self, hf_config: Any):
        try:
            self._read(hf_config)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"config.json's vision_config is incomplete or malformed ({exc}); compare it with the "
                "model's published config.json"
            ) from None
        if self.window_size is not None and self.window_size < self.patch_size * self.merge_size:
            raise ConfigError(
                f"vision_config.window_size {self.window_size} is smaller than one merged token "
                f"({self.patch_size * self.merge_size} px); Qwen2.5-VL checkpoints use 112"
            )

    def _read(self, hf_config: Any) -> None:
        vc = hf_config.vision_config
        self.qwen2_5 = (
            getattr(hf_config, "model_type", None) == "qwen2_5_vl"
            or getattr(vc, "model_type", None) == "qwen2_5_vl_vision"
        )
        self.depth = vc.depth
        self.num_heads = vc.num_heads
        self.patch_size = int(vc.patch_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        self.merge_size = int(vc.spatial_merge_size)
        self.in_channels = int(getattr(vc, "in_channels", None) or getattr(vc, "in_chans", None) or 3)
        self.hidden_act = vc.hidden_act
        rope = getattr(vc, "rope_parameters", None) or {}
        self.rope_theta = float(rope.get("rope_theta", 10000.0))
        self.window_size: int | None
        if self.qwen2_5:
            self.width = vc.hidden_size
            self.intermediate_size = vc.intermediate_size
            self.out_size = vc.out_hidden_size
            self.window_size = int(vc.window_size)
            self.full_attention_blocks = set(vc.fullatt_block_indexes)
        else:
            # Qwen2-VL names the tower's width embed_dim and its output (the LM's width) hidden_size
            self.width = vc.embed_dim
            self.intermediate_size = int(vc.embed_dim * vc.mlp_ratio)
            self.out_size = vc.hidden_size
            self.window_size = None
            self.full_attention_blocks = set(range(self.depth))
        self.head_dim = self.width // self.num_heads


def _norm(s: VisionSettings, size: int, dtype, device) -> nn.Module:
    if s.qwen2_5:
        return RMSNorm(size, 1e-6, dtype=dtype, device=device)
    return LayerNorm(size, 1e-6, dtype=dtype, device=device)


class Qwen2VisionPatchEmbed(nn.Module):
    """The checkpoint's Conv3d over one (T, P, P) patch, held as one GEMM (``proj``) over the
    patches the preprocessor already flattened."""

    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        kernel = (s.temporal_patch_size, s.patch_size, s.patch_size)
        self.proj = PATCH_EMBEDDINGS.build(
            dict(type="ConvPatchEmbedding", in_channels=s.in_channels, hidden_size=s.width, patch_size=kernel),
            dtype=dtype,
            device=device,
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class Qwen2VisionAttention(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.num_heads, self.head_dim = s.num_heads, s.head_dim
        self.qkv = build_qkv_proj(
            s.width, s.head_dim, s.num_heads, s.num_heads, bias=True, dtype=dtype, device=device, replicate=True
        )
        self.attn = VisionAttention(s.num_heads, s.head_dim)
        self.proj = build_replicated_linear(s.width, s.width, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``cu_seqlens``: sequence bounds, or a boolean ``[T, T]`` mask (which patch sees which:
        :meth:`Qwen2VisionTransformer.forward_traceable`)."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, k, cos, sin, is_neox=True)
        if cu_seqlens.dtype == torch.bool:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cu_seqlens, scale=self.attn.scale)
            return self.proj(out[0].transpose(0, 1).reshape(tokens, self.num_heads * self.head_dim))
        return self.proj(self.attn(q, k, v, cu_seqlens=cu_seqlens))


class Qwen2VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> quick GELU -> fc2."""

    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.fc1 = build_replicated_linear(s.width, s.intermediate_size, bias=True, dtype=dtype, device=device)
        self.fc2 = build_replicated_linear(s.intermediate_size, s.width, bias=True, dtype=dtype, device=device)
        self.act = get_act_fn(s.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2_5VisionMLP(nn.Module):
    """Qwen2.5-VL: SwiGLU with biases; gate and up fused into one GEMM (``gate_up_proj``)."""

    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        size = s.intermediate_size
        # sharded like a language model's MLP (the tower's largest GEMMs); the intermediate size
        # must divide by the tensor-parallel size (3420 in Qwen2.5-VL: up to 4 ranks)
        self.gate_up_proj = build_merged_colwise_linear(s.width, [size, size], bias=True, dtype=dtype, device=device)
        self.down_proj = build_rowwise_linear(size, s.width, bias=True, dtype=dtype, device=device)
        self.act_fn: nn.Module
        if s.hidden_act == "silu":
            self.act_fn = SiluAndMul()
        elif s.hidden_act in ("gelu", "gelu_pytorch_tanh"):
            self.act_fn = GeluAndMul("none" if s.hidden_act == "gelu" else "tanh")
        else:
            raise ValueError(f"unsupported vision activation {s.hidden_act!r} in the Qwen2.5-VL config")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen2VisionBlock(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.norm1 = _norm(s, s.width, dtype, device)
        self.norm2 = _norm(s, s.width, dtype, device)
        self.attn = Qwen2VisionAttention(s, dtype, device)
        self.mlp = (Qwen2_5VisionMLP if s.qwen2_5 else Qwen2VisionMLP)(s, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen2VisionPatchMerger(nn.Module):
    """Norm, then each merge x merge block of patches (consecutive rows) -> Linear -> GELU -> Linear."""

    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.merged_size = s.width * s.merge_size**2
        self.ln_q = _norm(s, s.width, dtype, device)
        self.mlp = nn.Sequential(  # indices 0 and 2 as in the checkpoint
            build_replicated_linear(self.merged_size, self.merged_size, bias=True, dtype=dtype, device=device),
            get_act_fn("gelu"),
            build_replicated_linear(self.merged_size, s.out_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_size))


# ----------------------------------------------------------------------------- layout helpers


def patch_rows_and_columns(grids: Sequence[Grid], merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch, in the preprocessor's order (merge blocks consecutive)."""
    rows, cols = [], []
    for t, h, w in grids:
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        r = torch.arange(h)[:, None].expand(h, w).reshape(block).transpose(1, 2).flatten()
        c = torch.arange(w)[None, :].expand(h, w).reshape(block).transpose(1, 2).flatten()
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    return torch.cat(rows), torch.cat(cols)


def cumulative_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(list(lengths), dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def window_order(grids: Sequence[Grid], merge_size: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the merged tokens of all pictures reordered window by window (each
    window ``window_units`` x ``window_units`` merged tokens, raster order inside, partial windows
    at the right and bottom edges), and each window's length in patches."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        rows, cols = h // merge_size, w // merge_size
        index = torch.arange(t * rows * cols).reshape(t, rows, cols) + offset
        for frame in range(t):
            for top in range(0, rows, window_units):
                for left in range(0, cols, window_units):
                    window = index[frame, top : top + window_units, left : left + window_units].flatten()
                    order.append(window)
                    lengths.append(window.numel() * merge_size**2)
        offset += t * rows * cols
    return torch.cat(order), lengths


def traceable_patch_layout(
    grid_thw: torch.Tensor, num_patches: int, merge_size: int, window_units: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column of every patch and which patches attend to each other, from a ``[images, 3]``
    grid tensor with tensor operations only, so that an exported graph takes the grids as an input.

    :return: rows ``[N]``, columns ``[N]``, and boolean ``[N, N]`` masks for full attention (same
        picture and frame) and for Qwen2.5-VL's windows (also the same window; the full mask when
        ``window_units`` is None). Equal to :func:`patch_rows_and_columns`, ``cumulative_lengths``
        and :func:`window_order` (attention within a window does not depend on the patches' order).
    """
    t, h, w = grid_thw.to(torch.long).unbind(-1)
    frame_size = h * w
    image_ends = torch.cumsum(t * frame_size, 0)
    index = torch.arange(num_patches, device=grid_thw.device)
    image = (index[:, None] >= image_ends[None, :]).sum(-1)  # the picture each patch belongs to
    local = index - (image_ends - t * frame_size)[image]
    frame = (torch.cumsum(t, 0) - t)[image] + local // frame_size[image]  # numbered over all pictures
    in_frame = local % frame_size[image]
    block, inside = in_frame // merge_size**2, in_frame % merge_size**2
    blocks_per_row = w[image] // merge_size
    rows = (block // blocks_per_row) * merge_size + inside // merge_size
    cols = (block % blocks_per_row) * merge_size + inside % merge_size
    full = frame[:, None] == frame[None, :]
    if window_units is None:
        return rows, cols, full, full
    window_row, window_col = rows // merge_size // window_units, cols // merge_size // window_units
    windows = full & (window_row[:, None] == window_row[None, :]) & (window_col[:, None] == window_col[None, :])
    return rows, cols, full, windows


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, s: VisionSettings, dtype, device):
        super().__init__()
        self.settings = s
        self.patch_embed = Qwen2VisionPatchEmbed(s, dtype, device)
        # rows rotate the first half of each head's frequencies, columns the second: a 1-D rope
        # of half the head size gives each half's angles
        self.rotary = RotaryEmbedding(s.head_dim // 2, max_position=1024, base=s.rope_theta)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(s, dtype, device) for _ in range(s.depth))
        self.merger = Qwen2VisionPatchMerger(s, dtype, device)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """``[num_patches, C * T * P * P]`` of all pictures -> ``[num_patches / merge^2, out_size]``."""
        s = self.settings
        device = patches.device
        x = self.patch_embed(patches)
        rows, cols = patch_rows_and_columns(grids, s.merge_size)
        cos_rows, sin_rows = self.rotary.cos_sin(rows.to(device))
        cos_cols, sin_cols = self.rotary.cos_sin(cols.to(device))
        cos, sin = torch.cat([cos_rows, cos_cols], dim=-1), torch.cat([sin_rows, sin_cols], dim=-1)
        full = cumulative_lengths([h * w for t, h, w in grids for _ in range(t)], device)

        order = None
        windows = full
        if s.window_size is not None:
            order, lengths = window_order(grids, s.merge_size, s.window_size // s.merge_size // s.patch_size)
            order = order.to(device)
            unit = s.merge_size**2  # patches of one merged token stay together
            x, cos, sin = (
                part.view(-1, unit, part.shape[-1])[order].view(-1, part.shape[-1]) for part in (x, cos, sin)
            )
            windows = cumulative_lengths(lengths, device)

        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if index in s.full_attention_blocks else windows)
        x = self.merger(x)
        if order is not None:
            x = x[torch.argsort(order)]
        return x

    def forward_traceable(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the grids as a ``[images, 3]`` tensor and attention restricted by
        masks rather than by sequence bounds: no Python control flow depends on the grids' values,
        so ``torch.export`` traces it for any number and size of pictures (``vlmrun export``)."""
        s = self.settings
        window_units = None if s.window_size is None else s.window_size // s.merge_size // s.patch_size
        rows, cols, full, windows = traceable_patch_layout(grid_thw, patches.shape[0], s.merge_size, window_units)
        x = self.patch_embed(patches)
        cos_rows, sin_rows = self.rotary.cos_sin(rows)
        cos_cols, sin_cols = self.rotary.cos_sin(cols)
        cos, sin = torch.cat([cos_rows, cos_cols], dim=-1), torch.cat([sin_rows, sin_cols], dim=-1)
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if index in s.full_attention_blocks else windows)
        return self.merger(x)


# ----------------------------------------------------------------------------- the model


def build_qwen2_vision_tower(hf_config: Any, dtype=None, device=None) -> Qwen2VisionTransformer:
    """The Qwen2-VL / Qwen2.5-VL tower as the config sets it up (registered as ``qwen2vl.Qwen2VisionTower``)."""
    return Qwen2VisionTransformer(VisionSettings(hf_config), dtype, device)


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """The vision tower for ``embed_images``; text goes straight to the language model
    (:class:`vlm.nn.VisionLanguageModel`)."""

    #: the engine passes [3, T] positions (M-RoPE: temporal, height, width)
    position_dims = 3
    #: ``vlmrun export --part vision`` makes these ``ImageInput.extra`` entries graph inputs
    #: (int64, one row per picture), so one exported tower takes pictures of any size
    vision_export_inputs = ("image_grid_thw",)

    def __init__(self, hf_config: Any, model_config: Any, dtype=torch.float32, device=None):
        super().__init__()
        self.config = hf_config
        self.visual = VISION_TOWERS.build(
            dict(type="qwen2vl.Qwen2VisionTower", hf_config=hf_config, dtype=dtype, device=device)
        )
        self.language_model = build_language_model(composite_text_config(hf_config), model_config, dtype, device)

    def embed_images(self, images: list[Any]) -> list[torch.Tensor]:
        """One pass of the tower over the patches of every picture -> ``[num_tokens, hidden]`` each."""
        patches = torch.cat([image.pixel_values for image in images])
        if isinstance(images[0].extra["image_grid_thw"], torch.Tensor):
            # an exported graph's input: [pictures, 3] grids, all pictures' tokens as one result
            grid_thw = torch.cat([image.extra["image_grid_thw"].reshape(-1, 3) for image in images])
            return [self.visual.forward_traceable(patches, grid_thw)]
        grids = [tuple(int(n) for n in image.extra["image_grid_thw"]) for image in images]
        features = self.visual(patches, grids)
        return list(features.split([image.num_tokens for image in images]))

    # -- weights (load_weights: VisionLanguageModel's) ---------------------------------------

    def own_weight_loader(self) -> WeightLoader:
        return WeightLoader(self, mappings=_VISION_MLP, rename=_own_name)

    def language_model_name(self, name: str) -> str | None:
        """The Qwen2 name of a language-model tensor in either naming, or None for the vision tower's.

        Saved checkpoints: ``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``, ``lm_head.*``;
        transformers' in-memory names: ``model.language_model.*`` instead of ``model.*``.
        """
        if re.match(r"^(model\.)?visual\.", name):
            return None
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        return name


_VISION_MLP = [
    WeightMapping("mlp.gate_up_proj", "mlp.gate_proj", 0),
    WeightMapping("mlp.gate_up_proj", "mlp.up_proj", 1),
]


def _own_name(name: str) -> str:
    # saved files say "visual.*"; transformers' in-memory names add a "model." prefix
    return re.sub(r"^model\.(?=visual\.)", "", name)
