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
from typing import Any

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

    def merge(self, other: LoadReport, prefix: str = "") -> LoadReport:
        """This report plus ``other``'s, whose names get ``prefix`` (a submodule's report)."""
        self.loaded += other.loaded
        self.missing += [prefix + n for n in other.missing]
        self.unexpected += [prefix + n for n in other.unexpected]
        self.mismatched += [prefix + n for n in other.mismatched]
        return self

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


def set_weight_loader(param: torch.Tensor, loader: Callable[..., None], shard_ids: list[Any] | None = None) -> None:
    """Give ``param`` the function that copies a *full* checkpoint tensor (or one shard of it, named
    by ``shard_ids``) into this rank's part of it; :class:`WeightLoader` calls it."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    if shard_ids is not None:
        param.shard_ids = shard_ids  # type: ignore[attr-defined]


def mark_optional(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a checkpoint tensor the model may have no parameter for (a GPTQ export's all-zero
    ``bias`` on a bias-free layer): :class:`WeightLoader` loads it where the model has the
    parameter and drops it, unreported, where it has not."""
    tensor.vlm_optional = True  # type: ignore[attr-defined]
    return tensor


def weight_loader_of(param: torch.Tensor) -> Callable[..., None]:
    """The loader :func:`set_weight_loader` gave ``param``, else :func:`default_weight_loader`."""
    return getattr(param, "weight_loader", default_weight_loader)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ShapeMismatch(tuple(param.shape), tuple(loaded.shape))
    param.data.copy_(loaded)


class WeightLoader:
    """Loads checkpoint tensors one at a time into ``module``; :meth:`finish` reports what did not fit.

    :param mappings: fused-parameter shards (see :class:`WeightMapping`).
    :param ignore: regular expressions of checkpoint names to skip (e.g. rotary caches).
    :param rename: maps a checkpoint name to a parameter name (``None`` skips the tensor).
    """

    def __init__(
        self,
        module: nn.Module,
        mappings: Iterable[WeightMapping] = (),
        ignore: Iterable[str] = (),
        rename: Callable[[str], str | None] | None = None,
    ) -> None:
        self.mappings = list(mappings)
        self.ignore = [re.compile(p) for p in ignore]
        self.rename = rename
        self.params = dict(module.named_parameters())
        self.loaded_shards: set[tuple[str, str | int | None]] = set()
        self.report = LoadReport()

    def load(self, checkpoint_name: str, tensor: torch.Tensor) -> None:
        name = self.rename(checkpoint_name) if self.rename else checkpoint_name
        if name is None or any(p.search(name) for p in self.ignore):
            return
        param_name, shard_id = name, None
        for mapping in self.mappings:
            if mapping.checkpoint in name:
                param_name, shard_id = name.replace(mapping.checkpoint, mapping.param), mapping.shard_id
                break
        param = self.params.get(param_name)
        if param is None:
            if not getattr(tensor, "vlm_optional", False):  # see mark_optional
                self.report.unexpected.append(checkpoint_name)
            return
        if param.is_floating_point() and not tensor.is_floating_point():
            # an int32 or bool tensor would be copied into float weights silently
            self.report.mismatched.append(f"{checkpoint_name} (a {tensor.dtype} tensor for a {param.dtype} parameter)")
            return
        loader = weight_loader_of(param)
        # a whole fused tensor (shard_id None) fills every shard of the parameter
        shards = [shard_id] if shard_id is not None else getattr(param, "shard_ids", [None])
        # reported as mis-shaped or loaded, never also as missing
        self.loaded_shards.update((param_name, shard) for shard in shards)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ShapeMismatch as exc:
            self.report.mismatched.append(f"{checkpoint_name} ({exc})")
            return
        self.report.loaded += 1

    def finish(self) -> LoadReport:
        for param_name, param in self.params.items():
            for shard_id in getattr(param, "shard_ids", [None]):
                if (param_name, shard_id) not in self.loaded_shards:
                    self.report.missing.append(_checkpoint_name(param_name, shard_id, self.mappings))
        return self.report


def load_weights_by_mapping(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    mappings: Iterable[WeightMapping] = (),
    ignore: Iterable[str] = (),
    rename: Callable[[str], str | None] | None = None,
) -> LoadReport:
    """Load ``(checkpoint_name, tensor)`` pairs into ``module`` (see :class:`WeightLoader`).

    :return: the report; the caller raises ``report.error(path)`` when it is not ``ok``.
    """
    loader = WeightLoader(module, mappings, ignore, rename)
    for checkpoint_name, tensor in weights:
        loader.load(checkpoint_name, tensor)
    return loader.finish()


def load_with_language_model(
    weights: Iterable[tuple[str, torch.Tensor]],
    own: WeightLoader,
    language_model: nn.Module,
    language_model_name: Callable[[str], str | None],
    prefix: str = "language_model.",
) -> LoadReport:
    """Stream one checkpoint into a VLM: language-model tensors to the LM plugin's ``load_weights``
    (renamed by ``language_model_name``; ``None`` means "not an LM tensor"), the rest to ``own``.

    Tensors are read once, in checkpoint order; nothing is buffered.
    """
    lm_params = {id(p) for p in language_model.parameters()}
    own.params = {name: p for name, p in own.params.items() if id(p) not in lm_params}

    def language_model_weights():
        for name, tensor in weights:
            lm_name = language_model_name(name)
            if lm_name is None:
                own.load(name, tensor)
            else:
                yield lm_name, tensor

    lm_report: LoadReport = language_model.load_weights(language_model_weights())  # type: ignore[operator]
    return own.finish().merge(lm_report, prefix)


def _checkpoint_name(param_name: str, shard_id: str | int | None, mappings: list[WeightMapping]) -> str:
    if shard_id is None:
        return param_name
    for mapping in mappings:
        if mapping.shard_id == shard_id and mapping.param in param_name:
            return param_name.replace(mapping.param, mapping.checkpoint)
    return f"{param_name}[{shard_id}]"
