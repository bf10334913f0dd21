"""Tensor-parallel linear layers (Megatron style) and their builders.

- colwise: the output features are split across ranks; no communication.
- rowwise: the input features are split; partial results are summed with all-reduce.
- merged colwise: several colwise outputs fused in one GEMM (gate + up).
- qkv: q, k, v projections fused, split by heads (k/v heads replicated when fewer than ranks).

Every parameter carries a ``weight_loader`` that takes the *full* checkpoint tensor and copies
this rank's slice, so model files map names and never think about sharding.

Quantization (:mod:`vlm.quantization`): a layer given a ``QuantConfig`` (``quant_config=`` of its
builder, or the engine's setting through ``assign_quant_config``) still loads its full-precision
slice, and quantizes it and frees the dense weight as soon as every shard of it has loaded, so
that loading holds one layer in full precision at a time, not the whole model (a layer whose
shards did not all come is quantized by ``prepare_for_inference``). Each rank's
quantized slice is exactly the slice of the unsharded quantized layer: scales never span output
rows; int4 groups never span a rank's input slice (a split that would cut one is refused up
front); and a rowwise layer keeps, while loading, each full row's largest magnitude for its int8
scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlm.distributed import all_reduce, divide, tp_rank, tp_world_size
from vlm.kernels.cpu_gemm import linear, pack_weight
from vlm.nn.weights import ShapeMismatch, set_weight_loader
from vlm.quantization import QuantConfig, QuantizationError, QuantizedWeight, check_input_features, quantize


def _parameter(shape: tuple[int, ...], dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _check(expected: tuple[int, ...], got: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(expected):
        raise ShapeMismatch(tuple(expected), tuple(got.shape))


class PackableLinear(nn.Module):
    """Base of the ``vlm.nn`` linears: holds ``weight`` / ``bias`` and, once prepared for inference,
    the packed or quantized weight that replaces the dense one."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.packed_weight: torch.Tensor | None = None
        self.quant_config: QuantConfig | None = None
        self.quantized: QuantizedWeight | None = None
        # [out]: each output row's largest magnitude over all input features, kept by a layer whose
        # weight holds a slice of them (rowwise, tensor-parallel) so that int8 uses the full row's scale
        self.row_absmax: torch.Tensor | None = None
        # the weight's shards loaded so far (see _weight_loaded)
        self._loaded_shards: set[object] = set()

    #: the shard ids a layer's weight is loaded in (None: one whole tensor)
    weight_shards: tuple[object, ...] = (None,)

    def _weight_loaded(self, shard_id: object = None) -> None:
        """Called by the weight loaders once shard ``shard_id`` of the weight is in: with every
        shard in, a layer to be quantized quantizes now (and frees the dense weight) instead of in
        ``prepare_for_inference``."""
        self._loaded_shards.add(shard_id)
        if (
            self.quant_config is not None
            and self.quantized is None
            and not self.weight.is_meta
            and self._loaded_shards.issuperset(self.weight_shards)
        ):
            self._quantize()

    def set_quant_config(self, config: QuantConfig | None, name: str = "") -> None:
        """Quantize this layer once its weight has loaded, or in ``prepare_for_inference`` (None: do not).

        :raises QuantizationError: its input features on this rank do not fit ``config``.
        """
        if config is not None:
            reason = check_input_features(config, self.weight.shape[1])
            if reason is not None:
                raise QuantizationError(f"cannot quantize {self._describe(name)} to {config.describe()}: {reason}")
        self.quant_config = config

    def _describe(self, name: str) -> str:
        out_features, in_features = self.weight.shape
        return f"{type(self).__name__} {name or '(unnamed)'} ({in_features} -> {out_features})"

    def _quantize(self) -> None:
        assert self.quant_config is not None
        self.quantized = quantize(self.weight.detach(), self.quant_config, self.row_absmax)
        self._free_dense_weight()

    def prepare_for_inference(self) -> None:
        if self.quant_config is not None:
            if self.quantized is None:  # quantized while loading, or by an earlier call
                self._quantize()
            return
        packed = pack_weight(self.weight)
        if packed is not None:
            self.packed_weight = packed
            self._free_dense_weight()

    def _free_dense_weight(self) -> None:
        # the dense copy is no longer read; keep the parameter (for names and shapes) but free it
        self.weight.data = torch.empty((0, self.weight.shape[1]), dtype=self.weight.dtype, device=self.weight.device)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.matmul(x, bias)
        return linear(x, self.weight, bias, self.packed_weight)


def prepare_for_inference(model: nn.Module) -> None:
    """Call every submodule's ``prepare_for_inference`` once weights are loaded."""
    for module in model.modules():
        prepare = getattr(module, "prepare_for_inference", None)
        if prepare is not None and module is not model:
            prepare()


class ColwiseLinear(PackableLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = divide(out_features, tp_world_size(), "output features")
        self.weight = _parameter((self.out_per_rank, in_features), dtype, device)
        set_weight_loader(self.weight, self._load)
        self.bias = _parameter((self.out_per_rank,), dtype, device) if bias else None
        if self.bias is not None:
            set_weight_loader(self.bias, self._load)
        self.set_quant_config(quant_config)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check((self.out_features, *param.shape[1:]), loaded)
        param.data.copy_(loaded.narrow(0, tp_rank() * self.out_per_rank, self.out_per_rank))
        if param is self.weight:
            self._weight_loaded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowwiseLinear(PackableLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, tp_world_size(), "input features")
        self.weight = _parameter((out_features, self.in_per_rank), dtype, device)
        set_weight_loader(self.weight, self._load_weight)
        self.bias = _parameter((out_features,), dtype, device) if bias else None
        self.set_quant_config(quant_config)

    def _describe(self, name: str) -> str:
        world = self.in_features // self.in_per_rank
        if world == 1:
            return super()._describe(name)
        return (
            f"{type(self).__name__} {name or '(unnamed)'} ({self.in_features} -> {self.out_features}) split over "
            f"tensor-parallel size {world} ({self.in_per_rank} input features per rank)"
        )

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check((self.out_features, self.in_features), loaded)
        if self.quant_config is not None and self.in_per_rank != self.in_features:
            # of the values as this layer stores them, as the unsharded layer would compute it
            self.row_absmax = loaded.detach().to(param.dtype).abs().amax(dim=1).float()
        param.data.copy_(loaded.narrow(1, tp_rank() * self.in_per_rank, self.in_per_rank))
        self._weight_loaded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(self.matmul(x, None))
        # the bias is added after the reduction so that it is counted once, not once per rank
        return out if self.bias is None else out + self.bias


class MergedColwiseLinear(PackableLinear):
    """Several colwise projections of the same input in one GEMM; shard ids are 0, 1, ..."""

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        world = tp_world_size()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.sizes_per_rank = [divide(size, world, "output features") for size in out_sizes]
        self.weight = _parameter((sum(self.sizes_per_rank), in_features), dtype, device)
        self.bias = _parameter((sum(self.sizes_per_rank),), dtype, device) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                set_weight_loader(param, self._load, list(range(len(out_sizes))))
        self.weight_shards = tuple(range(len(out_sizes)))
        self.set_quant_config(quant_config)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        _check((self.out_sizes[shard_id], *param.shape[1:]), loaded)
        size = self.sizes_per_rank[shard_id]
        offset = sum(self.sizes_per_rank[:shard_id])
        param.data[offset : offset + size].copy_(loaded.narrow(0, tp_rank() * size, size))
        if param is self.weight:
            self._weight_loaded(shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class QKVLinear(PackableLinear):
    """Fused q/k/v projection split by heads; shard ids are "q", "k", "v".

    ``replicate=True`` keeps every head on every rank (vision towers, whose q/k norms span all heads).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype=None,
        device=None,
        replicate: bool = False,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.world, self.rank = (1, 0) if replicate else (tp_world_size(), tp_rank())
        world = self.world
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, world, "attention heads")
        # fewer kv heads than ranks: each rank keeps a copy of the kv head its q heads use
        self.num_kv_heads = max(1, num_kv_heads // world)
        if num_kv_heads >= world and num_kv_heads % world:
            divide(num_kv_heads, world, "key/value heads")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out = self.q_size + 2 * self.kv_size
        self.weight = _parameter((out, hidden_size), dtype, device)
        self.bias = _parameter((out,), dtype, device) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                set_weight_loader(param, self._load, ["q", "k", "v"])
        self.weight_shards = ("q", "k", "v")
        self.set_quant_config(quant_config)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:  # a checkpoint that stores q, k, v already fused in this order
            total = (self.total_heads + 2 * self.total_kv_heads) * self.head_dim
            _check((total, *param.shape[1:]), loaded)
            q, k, v = loaded.split(
                [
                    self.total_heads * self.head_dim,
                    self.total_kv_heads * self.head_dim,
                    self.total_kv_heads * self.head_dim,
                ]
            )
            for shard, part in (("q", q), ("k", k), ("v", v)):
                self._load(param, part, shard)
            return
        heads = self.total_heads if shard_id == "q" else self.total_kv_heads
        _check((heads * self.head_dim, *param.shape[1:]), loaded)
        if shard_id == "q":
            offset, size, head_start = 0, self.q_size, self.rank * self.num_heads
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
            ranks_per_kv_head = max(1, self.world // self.total_kv_heads)
            head_start = (self.rank // ranks_per_kv_head) * self.num_kv_heads
        rows = loaded.narrow(0, head_start * self.head_dim, size)
        param.data[offset : offset + size].copy_(rows)
        if param is self.weight:
            self._weight_loaded(shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(PackableLinear):
    """A whole linear layer on every rank (small layers, vision towers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=None,
        device=None,
        *,
        quant_config: QuantConfig | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _parameter((out_features, in_features), dtype, device)
        set_weight_loader(self.weight, self._load_weight)
        self.bias = _parameter((out_features,), dtype, device) if bias else None
        self.set_quant_config(quant_config)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check(tuple(param.shape), loaded)
        param.data.copy_(loaded)
        self._weight_loaded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def build_replicated_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    dtype=None,
    device=None,
    *,
    quant_config: QuantConfig | None = None,
) -> ReplicatedLinear:
    return ReplicatedLinear(in_features, out_features, bias=bias, dtype=dtype, device=device, quant_config=quant_config)


def build_colwise_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    dtype=None,
    device=None,
    *,
    quant_config: QuantConfig | None = None,
) -> ColwiseLinear:
    return ColwiseLinear(in_features, out_features, bias=bias, dtype=dtype, device=device, quant_config=quant_config)


def build_rowwise_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    dtype=None,
    device=None,
    *,
    quant_config: QuantConfig | None = None,
) -> RowwiseLinear:
    return RowwiseLinear(in_features, out_features, bias=bias, dtype=dtype, device=device, quant_config=quant_config)


def build_merged_colwise_linear(
    in_features: int,
    out_sizes: Sequence[int],
    bias: bool = False,
    dtype=None,
    device=None,
    *,
    quant_config: QuantConfig | None = None,
) -> MergedColwiseLinear:
    return MergedColwiseLinear(in_features, out_sizes, bias=bias, dtype=dtype, device=device, quant_config=quant_config)


def build_qkv_proj(
    hidden_size: int,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    bias: bool = False,
    dtype=None,
    device=None,
    replicate: bool = False,
    *,
    quant_config: QuantConfig | None = None,
) -> QKVLinear:
    return QKVLinear(
        hidden_size,
        head_dim,
        num_heads,
        num_kv_heads,
        bias=bias,
        dtype=dtype,
        device=device,
        replicate=replicate,
        quant_config=quant_config,
    )
