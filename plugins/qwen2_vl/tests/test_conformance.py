"""vlm-plugin-qwen2vl through the conformance kit that every plugin uses (vlm.testing.conformance),
for Qwen2-VL and Qwen2.5-VL, with transformers' models as greedy-parity references (called with
the grids and token types they need, see vlm.testing.qwen2_vl.ReferenceModel)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm.config import RawConfig
from vlm.inputs import ModelInputs
from vlm.testing.conformance import PluginConformanceTests
from vlm.testing.qwen2_vl import FLAVORS, ReferenceModel, reference_inputs, write_tiny_qwen2_vl

_replace = dataclasses.replace


def _replace_extending_positions(obj, **changes):
    """``dataclasses.replace`` that keeps M-RoPE positions as long as the token ids: tokens past
    the prompt sit at ``index + position_delta`` in all three rows, as the engine places them."""
    new = _replace(obj, **changes)
    if isinstance(new, ModelInputs) and new.positions is not None and new.positions.shape[1] < len(new.token_ids):
        known = new.positions.shape[1]
        more = torch.arange(known, len(new.token_ids)).expand(3, -1) + new.position_delta
        new = _replace(new, positions=torch.cat([new.positions, more], dim=1))
    return new


class TestQwen2VLConformance(PluginConformanceTests):
    plugin = "qwen2vl"
    reference = ReferenceModel
    reference_inputs = staticmethod(reference_inputs)
    foreign_configs = [
        RawConfig({"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl"}),
        RawConfig({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}),
    ]

    @pytest.fixture(scope="class", params=FLAVORS)
    @classmethod
    def checkpoint(cls, request, tmp_path_factory):
        return str(write_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=1))

    def test_incremental_decoding_equals_full_forward(self, conformance, monkeypatch):
        # the kit appends tokens to the probe prompt with dataclasses.replace(inputs, token_ids=...),
        # which keeps the prompt's [3, T] positions for T + n tokens: the engine would then place
        # the n tokens at 0..T+n-1 without the M-RoPE delta. Extend the positions as the engine
        # places generated tokens until the kit does it itself.
        monkeypatch.setattr(dataclasses, "replace", _replace_extending_positions)
        super().test_incremental_decoding_equals_full_forward(conformance)
