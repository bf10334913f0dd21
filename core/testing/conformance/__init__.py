"""The plugin conformance kit: what every vlm plugin must do, checked on a tiny checkpoint.

Each check raises :class:`ConformanceError` (an ``AssertionError``) whose message says what the
plugin must change, e.g. ``load_weights left these checkpoint tensors unused: ...; map them in
load_weights``. Two ways to use it:

**In pytest** (what the first-party plugins and the cookiecutter template do): subclass
:class:`PluginConformanceTests` in a test module, name the plugin and give a ``checkpoint``
fixture (module scope or wider); every check becomes a test::

    import pytest
    from vlm.testing.conformance import PluginConformanceTests

    class TestConformance(PluginConformanceTests):
        plugin = "llama"                                     # entry-point name, or the module
        reference = "transformers:AutoModelForCausalLM"      # optional: greedy parity against it
        reference_processor = "transformers:AutoTokenizer"   # optional: preprocessing parity

    @pytest.fixture(scope="module")
    def checkpoint(tiny_models):
        return tiny_models("qwen2")

The package: :mod:`.checks` (:class:`Conformance`, one method per check), :mod:`.harness`
(drives a model through the engine's own :class:`vlm.engine.model_runner.ModelRunner`),
:mod:`.inputs` (pictures, prompts and foreign configs the checks use), :mod:`.suite` (the pytest
base class).

**As functions**: ``Conformance(plugin, checkpoint, reference=None, reference_processor=None)
.check_match()`` and so on, or :func:`run_conformance` for all of them.

The checks (:data:`CHECKS`, in order):

- ``plugin_loads``: the plugin manager registered the plugin (no misspelled hook, a compatible
  ``vlm_api_version``) and it implements the required hooks.
- ``match``: ``match`` claims the checkpoint's config, the core picks this plugin for it, and it
  declines configs of other families (and, for a VLM, its own nested text config).
- ``architectures``: ``architectures()`` lists the checkpoint's architecture.
- ``lazy_torch_import``: importing the plugin module does not import torch.
- ``build_model``: the model honours the ``dtype`` and ``device`` it is given, has the protocol's
  methods, and loads on the ``meta`` device as ``vlmrun check`` does.
- ``load_weights``: every checkpoint tensor is consumed and every parameter written (nothing
  missing, unexpected or mis-shaped in the :class:`vlm.nn.LoadReport`).
- ``preprocessor``: text prompts, chat messages and token ids become :class:`vlm.inputs.ModelInputs`.
- ``images``: odd sizes and modes (1x1, 17x300, 300x17, 1000x50, RGBA, L, P, CMYK) are handled,
  and the number of placeholder tokens equals ``ImageInput.num_tokens`` equals the rows
  ``embed_images`` returns. A text-only plugin must refuse images with :class:`vlm.errors.InputError`.
- ``preprocessing`` (only with a reference processor): the token ids equal the reference
  processor's (transformers' processor, or the family's own reference) and the pixel values equal
  its ``pixel_values`` within 1e-6, for a string prompt, chat messages and each of the odd images
  above: a wrong tile order, resample filter or normalisation fails here (the parity check feeds
  the reference vlm's own tokens and pixels, so it cannot see them). A text-only plugin is
  compared with its tokenizer (``"transformers:AutoTokenizer"``) on string prompts and chat messages.
- ``forward``: shapes and dtypes of ``embed_tokens``, ``forward`` and ``compute_logits``, in
  float32 and bfloat16, and ``inputs_embeds`` is honoured.
- ``incremental_decoding``: a prefill followed by N decode steps with the paged KV cache, and a
  prefill in two chunks, give the logits of one forward over the whole sequence.
- ``batch_invariance``: through :class:`vlm.LLM`, requests batched together give the tokens and
  logits they give alone.
- ``greedy_parity`` (only with a reference): greedy tokens and logits equal the reference's.
"""

from vlm.testing.conformance.checks import CHECKS, Conformance, ConformanceError, run_conformance
from vlm.testing.conformance.inputs import default_prompts, describe_config, image_message, odd_images, probe_configs
from vlm.testing.conformance.suite import PluginConformanceTests

__all__ = [
    "CHECKS",
    "Conformance",
    "ConformanceError",
    "PluginConformanceTests",
    "default_prompts",
    "describe_config",
    "image_message",
    "odd_images",
    "probe_configs",
    "run_conformance",
]
