"""Mapping checkpoint tensors onto model parameters, with a full report of what did not fit.

A model's ``load_weights(weights)`` is usually one call to :func:`load_weights_by_mapping` with
the list of checkpoint tensors that are shards of one fused parameter (q/k/v into ``qkv_proj``,
gate/up into ``gate_up_proj``). Each parameter may carry a ``weight_loader(param, tensor,
shard_id=None)`` attribute that knows its tensor-parallel slice; the default copies whole.

The same code checks a checkpoint without reading it: ``vlmrun check`` builds the model on the
``meta`` device and feeds meta tensors with the checkpoint's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.errors import WeightsError


class ShapeMismatch(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"expected {list(expected)}, got {list(got)}")
        self.expected, self.got = expected, got


@dataclass(frozen=True)
class WeightMapping:
    """Checkpoint names containing ``checkpoint`` are shard ``shard_id`` of the parameter whose
    name has ``param`` in that place, e.g. ``WeightMapping("qkv_proj", "q_proj", "q")``."""

    param: str
    checkpoint: str
    shard_id: str | int


@dataclass
class LoadReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def error(self, where: str) -> WeightsError:
        return CheckpointMismatchError(where, self)


class CheckpointMismatchError(WeightsError):
    def __init__(self, where: str, report: LoadReport) -> None:
        self.report = report
        parts = []
        for label, names in (
            ("missing", report.missing),
            ("unexpected", report.unexpected),
            ("mis-shaped", report.mismatched),
        ):
            if names:
                shown = ", ".join(names[:8]) + (f", ... and {len(names) - 8} more" if len(names) > 8 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        super().__init__(
            f"checkpoint in {where} does not fit the model ({'; '.join(parts)}); "
            "check that the plugin matches this checkpoint (`vlmrun check --model ...` lists all)"
        )


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ShapeMismatch(tuple(param.shape), tuple(loaded.shape))
    param.data.copy_(loaded)


def load_weights_by_mapping(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    mappings: Iterable[WeightMapping] = (),
    ignore: Iterable[str] = (),
    rename: Callable[[str], str | None] | None = None,
) -> LoadReport:
    """Load ``(checkpoint_name, tensor)`` pairs into ``module``'s parameters.

    :param mappings: fused-parameter shards (see :class:`WeightMapping`).
    :param ignore: regular expressions of checkpoint names to skip (e.g. rotary caches).
    :param rename: maps a checkpoint name to a parameter name (``None`` skips the tensor).
    :return: the report; the caller raises ``report.error(path)`` when it is not ``ok``.
    """
    mappings = list(mappings)
    ignore_patterns = [re.compile(p) for p in ignore]
    params = dict(module.named_parameters())
    loaded_shards: set[tuple[str, str | int | None]] = set()
    report = LoadReport()
    for checkpoint_name, tensor in weights:
        name = rename(checkpoint_name) if rename else checkpoint_name
        if name is None or any(p.search(name) for p in ignore_patterns):
            continue
        param_name, shard_id = name, None
        for mapping in mappings:
            if mapping.checkpoint in name:
                param_name, shard_id = name.replace(mapping.checkpoint, mapping.param), mapping.shard_id
                break
        param = params.get(param_name)
        if param is None:
            report.unexpected.append(checkpoint_name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ShapeMismatch as exc:
            report.mismatched.append(f"{checkpoint_name} ({exc})")
            # reported as mis-shaped; listing it as missing as well would count it twice
            loaded_shards.add((param_name, shard_id))
            continue
        loaded_shards.add((param_name, shard_id))
        report.loaded += 1
    for param_name, param in params.items():
        for shard_id in getattr(param, "shard_ids", [None]):
            if (param_name, shard_id) not in loaded_shards:
                report.missing.append(_checkpoint_name(param_name, shard_id, mappings))
    return report


def _checkpoint_name(param_name: str, shard_id: str | int | None, mappings: list[WeightMapping]) -> str:
    if shard_id is None:
        return param_name
    for mapping in mappings:
        if mapping.shard_id == shard_id and mapping.param in param_name:
            return param_name.replace(mapping.param, mapping.checkpoint)
    return f"{param_name}[{shard_id}]"
