"""The pytest glue: :class:`PluginConformanceTests` turns every check into a test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import pytest

from vlm.inputs import ModelInputs
from vlm.testing.conformance.checks import Conformance


class PluginConformanceTests:
    """Base class for a plugin's conformance tests: subclass it as ``Test...`` in a test module.

    Set ``plugin`` (name or module) and optionally ``reference``, ``reference_inputs``,
    ``reference_processor``, ``reference_pixels`` (see :class:`Conformance`), ``foreign_configs``, ``max_images``,
    ``prompts``, ``new_tokens``, ``atol``, and provide a ``checkpoint`` fixture of class scope or
    wider that returns a tiny checkpoint directory: in the test module
    (``@pytest.fixture(scope="module")``), in conftest.py, or in the class as a
    ``@pytest.fixture(scope="class")`` over a ``@classmethod``. It may be parametrized to run the
    suite on several checkpoints. Class attributes are read from the class, so a plain function
    (e.g. ``reference_inputs``) stays a function.
    """

    plugin: str | ModuleType | None = None
    reference: Any = None
    reference_inputs: Callable[[ModelInputs], dict[str, Any]] | None = None
    reference_processor: Any = None
    reference_pixels: Callable[[Any], Any] | None = None
    foreign_configs: Sequence[Any] = ()
    max_images: int | None = None
    prompts: Sequence[Any] | None = None
    new_tokens: int = 16
    atol: float = 1e-4

    @pytest.fixture(scope="class")
    @classmethod
    def conformance(cls, checkpoint) -> Conformance:
        if cls.plugin is None:
            pytest.fail(f"{cls.__name__} must set `plugin` to the plugin's name or module")
        return Conformance(
            cls.plugin,
            checkpoint,
            cls.reference,
            reference_inputs=cls.reference_inputs,
            reference_processor=cls.reference_processor,
            reference_pixels=cls.reference_pixels,
            foreign_configs=cls.foreign_configs,
            max_images=cls.max_images,
            prompts=cls.prompts,
            new_tokens=cls.new_tokens,
            atol=cls.atol,
        )

    def test_plugin_loads(self, conformance):
        conformance.check_plugin_loads()

    def test_match_claims_its_config_and_declines_others(self, conformance):
        conformance.check_match()

    def test_architectures_lists_the_checkpoint(self, conformance):
        conformance.check_architectures()

    def test_plugin_module_imports_torch_lazily(self, conformance):
        conformance.check_lazy_torch_import()

    def test_build_model_honours_dtype_device_and_protocol(self, conformance):
        conformance.check_build_model()

    def test_load_weights_consumes_every_tensor(self, conformance):
        conformance.check_load_weights()

    def test_preprocessor_handles_text_and_token_ids(self, conformance):
        conformance.check_preprocessor()

    def test_images_odd_sizes_modes_and_placeholder_count(self, conformance):
        conformance.check_images()

    def test_preprocessing_equals_reference_processor(self, conformance):
        if conformance.reference_processor is None:
            pytest.skip(
                "no reference processor given (set `reference_processor` to compare token ids and pixels with "
                "the transformers processor or the family's own reference)"
            )
        conformance.check_preprocessing()

    def test_forward_shapes_and_dtypes(self, conformance):
        conformance.check_forward()

    def test_incremental_decoding_equals_full_forward(self, conformance):
        conformance.check_incremental_decoding()

    def test_batch_invariance(self, conformance):
        conformance.check_batch_invariance()

    def test_greedy_parity_with_reference(self, conformance):
        if conformance.reference is None:
            pytest.skip("no reference given (set `reference` to compare greedy output with it)")
        conformance.check_greedy_parity()
