"""The conformance kit (vlm.testing.conformance) catches each way a plugin breaks the contract, and
says what to change; one ``test_hook_<name>`` per hook (tests/test_docs.py requires them).

Faulty plugins are made here as modules: the llama plugin's model with one thing wrong, claiming
the tiny Qwen2 checkpoint at a priority above the real llama plugin.
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType

import pytest
import torch

from vlm.hookspecs import Claim, hookimpl
from vlm.plugin.manager import reset_registry
from vlm.testing.conformance import CHECKS, Conformance, ConformanceError, PluginConformanceTests, odd_images


@pytest.fixture(autouse=True)
def fresh_registry():
    """Plugins registered as modules by a test are forgotten after it."""
    reset_registry()
    yield
    reset_registry()


def qwen2_config(hf_config) -> bool:
    return "Qwen2ForCausalLM" in (getattr(hf_config, "architectures", None) or [])


def llama_model(hf_config, dtype, device):
    from vlm_plugin_llama.model import LlamaForCausalLM

    return LlamaForCausalLM(hf_config, dtype=dtype, device=device)


def text_preprocessor(tokenizer):
    from vlm.inputs import TextPreprocessor

    return TextPreprocessor(tokenizer)


def make_plugin(name: str, **overrides) -> ModuleType:
    """A plugin module serving Qwen2 with the llama plugin's model; ``overrides`` replace hooks
    (``None`` leaves a hook out)."""

    def architectures():
        return ["Qwen2ForCausalLM"]

    def match(hf_config):
        return Claim(priority=10, reason="test") if qwen2_config(hf_config) else None

    def build_preprocessor(tokenizer):
        return text_preprocessor(tokenizer)

    def build_model(hf_config, dtype, device):
        return llama_model(hf_config, dtype, device)

    hooks = dict(
        architectures=architectures, match=match, build_preprocessor=build_preprocessor, build_model=build_model
    )
    hooks.update(overrides)
    module = ModuleType(name)
    module.vlm_api_version = ">=1.0,<2"
    for hook, function in hooks.items():
        if function is not None:
            setattr(module, hook, hookimpl(function))
    return module


def fails(conformance: Conformance, check: str, *patterns: str) -> str:
    """Run one check, which must fail with a message matching every pattern."""
    with pytest.raises(ConformanceError) as info:
        getattr(conformance, f"check_{check}")()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    return message


# -- a plugin that keeps the contract passes every check ---------------------------------


def test_llama_plugin_passes_every_check_through_the_function_api(tiny_qwen2):
    conformance = Conformance(
        "llama",
        tiny_qwen2,
        "transformers:AutoModelForCausalLM",
        reference_processor="transformers:AutoTokenizer",
        new_tokens=8,
    )
    conformance.run_all()
    assert conformance.check_greedy_parity() is True
    assert conformance.check_preprocessing() is True
    assert Conformance("llama", tiny_qwen2).check_greedy_parity() is False  # no reference: nothing to compare
    assert Conformance("llama", tiny_qwen2).check_preprocessing() is False


def test_the_pytest_base_class_has_one_test_per_check():
    tests = [name for name in dir(PluginConformanceTests) if name.startswith("test_")]
    assert len(tests) == len(CHECKS)


def test_vlm_testing_exports_the_kit_lazily():
    import vlm.testing

    assert vlm.testing.Conformance is Conformance
    assert "Conformance" in vlm.testing.__all__


def test_odd_images_cover_sizes_and_modes():
    images = dict(odd_images())
    assert images["1x1 RGB"].size == (1, 1) and images["17x300 RGB"].size == (17, 300)
    assert images["300x17 RGB"].size == (300, 17) and images["1000x50 RGB"].size == (1000, 50)
    assert {image.mode for image in images.values()} >= {"RGB", "RGBA", "L", "P"}


def test_a_plugin_name_that_is_not_installed_says_how_to_install(tiny_qwen2):
    fails(
        Conformance("vlm-plugin-nope", tiny_qwen2),
        "plugin_loads",
        r"no plugin named 'vlm-plugin-nope'",
        r"pip install -e \.",
    )


# -- one test per hook ---------------------------------------------------------------------


def test_hook_architectures(tiny_qwen2):
    Conformance("llama", tiny_qwen2).check_architectures()
    fails(
        Conformance(make_plugin("vlmtest_other_archs", architectures=lambda: ["OtherForCausalLM"]), tiny_qwen2),
        "architectures",
        r"returns \['OtherForCausalLM'\] but not \['Qwen2ForCausalLM'\]",
        "list every architecture",
    )
    reset_registry()
    fails(
        Conformance(make_plugin("vlmtest_no_archs", architectures=None), tiny_qwen2),
        "plugin_loads",
        r"does not implement architectures\(\)",
        "vlmrun plugins",
    )


def test_hook_match(tiny_qwen2):
    Conformance("llama", tiny_qwen2).check_match()

    def claims_everything(hf_config):
        return Claim(priority=10)

    fails(
        Conformance(make_plugin("vlmtest_greedy_match", match=claims_everything), tiny_qwen2),
        "match",
        r"claimed a config of another family",
        r"decline \(return None\)",
    )
    reset_registry()

    def assumes_architectures(hf_config):
        return Claim(priority=10) if "Qwen2ForCausalLM" in hf_config.architectures else None

    fails(
        Conformance(make_plugin("vlmtest_fragile_match", match=assumes_architectures), tiny_qwen2),
        "match",
        r"raised TypeError on a config of another family",
        r"getattr\(hf_config, 'architectures', None\) or \[\]",
    )
    reset_registry()

    fails(
        Conformance(make_plugin("vlmtest_shy_match", match=lambda hf_config: None), tiny_qwen2),
        "match",
        r"declined the config of the checkpoint",
        r"return Claim",
    )
    reset_registry()

    def equal_priority(hf_config):
        return Claim(priority=0) if qwen2_config(hf_config) else None

    fails(
        Conformance(make_plugin("vlmtest_rival_match", match=equal_priority), tiny_qwen2),
        "match",
        r"cannot pick a plugin",
        r"'llama'",
        r"higher priority",
    )


def test_hook_build_preprocessor(tiny_qwen2):
    Conformance("llama", tiny_qwen2).check_preprocessor()
    Conformance("llama", tiny_qwen2).check_images()  # a text-only model refuses images

    fails(
        Conformance(make_plugin("vlmtest_dict_preprocessor", build_preprocessor=lambda tokenizer: {}), tiny_qwen2),
        "preprocessor",
        r"returned dict, which is not callable",
    )
    reset_registry()

    fails(
        Conformance(make_plugin("vlmtest_no_preprocessor", build_preprocessor=lambda tokenizer: None), tiny_qwen2),
        "preprocessor",
        r"returned nothing from the 'build_preprocessor' hook",
        r"must return a preprocessor",
    )
    reset_registry()

    class ReturnsDict:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, prompt, add_generation_prompt=True):
            return {"token_ids": [1, 2, 3]}

    plugin = make_plugin("vlmtest_dict_inputs", build_preprocessor=lambda tokenizer: ReturnsDict(tokenizer))
    fails(
        Conformance(plugin, tiny_qwen2),
        "preprocessor",
        r"returned dict for a plain string prompt; return vlm.inputs.ModelInputs",
    )
    reset_registry()

    def drops_images(tokenizer):
        inner = text_preprocessor(tokenizer)

        class DropsImages:
            def __init__(self):
                self.tokenizer = tokenizer

            def __call__(self, prompt, add_generation_prompt=True):
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                    prompt = [{**m, "content": [p for p in m["content"] if p.get("type") == "text"]} for m in prompt]
                return inner(prompt, add_generation_prompt)

        return DropsImages()

    fails(
        Conformance(make_plugin("vlmtest_drops_images", build_preprocessor=drops_images), tiny_qwen2),
        "images",
        r"accepted an image part; refuse images with vlm.errors.InputError",
    )


def _model_subclass(**methods):
    from vlm_plugin_llama.model import LlamaForCausalLM

    return type("FaultyLlama", (LlamaForCausalLM,), methods)


def _build_with(cls):
    def build_model(hf_config, dtype, device):
        return cls(hf_config, dtype=dtype, device=device)

    return build_model


def test_hook_build_model(tiny_qwen2):
    from vlm.nn import WeightMapping, load_weights_by_mapping
    from vlm_plugin_llama.model import LlamaForCausalLM

    ok = Conformance("llama", tiny_qwen2)
    for check in ("build_model", "load_weights", "forward", "incremental_decoding"):
        getattr(ok, f"check_{check}")()

    def cases():
        yield (
            "ignores dtype",
            dict(build_model=lambda hf_config, device: llama_model(hf_config, torch.float32, device)),
            "build_model",
            [r"made these parameters in another dtype", r"pass dtype="],
        )

        def no_gate_up(self, weights):
            mappings = [WeightMapping("qkv_proj", n, s) for n, s in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))]
            return load_weights_by_mapping(self, weights, mappings)

        yield (
            "forgets a mapping",
            dict(build_model=_build_with(_model_subclass(load_weights=no_gate_up))),
            "load_weights",
            [
                r"load_weights left these checkpoint tensors unused: model\.layers\.\d\.mlp\.(gate|up)_proj\.weight",
                r"map them in load_weights",
                r"these model parameters got no checkpoint tensor: .*gate_up_proj",
            ],
        )

        def claims_all_loaded(self, weights):
            report = LlamaForCausalLM.load_weights(self, (w for w in weights if w[0] != "model.norm.weight"))
            report.missing.remove("model.norm.weight")
            return report

        yield (
            "reports a parameter it never wrote",
            dict(build_model=_build_with(_model_subclass(load_weights=claims_all_loaded))),
            "load_weights",
            [r"never wrote .*model\.norm\.weight", r"weight_loader"],
        )

        yield (
            "returns no report",
            dict(build_model=_build_with(_model_subclass(load_weights=lambda self, weights: None))),
            "load_weights",
            [r"load_weights returned NoneType; return the vlm.nn.LoadReport"],
        )

        def counts_positions_from_zero(self, input_ids, positions, batch, inputs_embeds=None):
            positions = torch.arange(input_ids.shape[0], device=input_ids.device)
            return LlamaForCausalLM.forward(self, input_ids, positions, batch, inputs_embeds)

        yield (
            "ignores positions",
            dict(build_model=_build_with(_model_subclass(forward=counts_positions_from_zero))),
            "incremental_decoding",
            [r"incremental decoding disagrees with a full forward", r"`positions` argument"],
        )

        def mixes_sequences(self, input_ids, positions, batch, inputs_embeds=None):
            hidden = LlamaForCausalLM.forward(self, input_ids, positions, batch, inputs_embeds)
            return hidden + hidden.mean(dim=0, keepdim=True)

        yield (
            "mixes the sequences of a batch",
            dict(build_model=_build_with(_model_subclass(forward=mixes_sequences))),
            "batch_invariance",
            [r"batched with 2 others than alone", r"no reductions over the token dimension"],
        )

        def ignores_inputs_embeds(self, input_ids, positions, batch, inputs_embeds=None):
            return LlamaForCausalLM.forward(self, input_ids, positions, batch, None)

        yield (
            "ignores inputs_embeds",
            dict(build_model=_build_with(_model_subclass(forward=ignores_inputs_embeds))),
            "forward",
            [r"ignores E: when inputs_embeds is given, use it"],
        )

        def float16_logits(self, hidden_states):
            return self.lm_head(hidden_states).half()

        yield (
            "returns float16 logits",
            dict(build_model=_build_with(_model_subclass(compute_logits=float16_logits))),
            "forward",
            [r"compute_logits returned torch.float16; return float32 logits"],
        )

    for index, (what, hooks, check, patterns) in enumerate(cases()):
        reset_registry()
        plugin = make_plugin(f"vlmtest_faulty_model_{index}", **hooks)
        try:
            fails(Conformance(plugin, tiny_qwen2), check, *patterns)
        except AssertionError as exc:
            raise AssertionError(f"a model that {what}: {exc}") from None


def test_greedy_parity_catches_a_wrong_reference(tiny_models):
    """Parity against a different model (other weights) fails with the step and the tokens."""
    other = tiny_models("qwen2", seed=1)

    def reference(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(other)

    fails(
        Conformance("llama", tiny_models("qwen2"), reference, new_tokens=4),
        "greedy_parity",
        r"differs from the reference at step 0",
        r"layer by layer",
    )


def test_a_misspelled_hook_is_reported_by_the_plugin_manager(tiny_qwen2):
    plugin = make_plugin("vlmtest_misspelled_kit")
    plugin.buld_model = hookimpl(lambda hf_config, dtype, device: None)
    fails(
        Conformance(plugin, tiny_qwen2),
        "plugin_loads",
        r"refused plugin 'vlmtest_misspelled_kit'",
        r"'buld_model'",
        r"misspelled",
    )


def test_a_plugin_that_imports_torch_eagerly_is_reported(tmp_path, tiny_qwen2, monkeypatch):
    (tmp_path / "vlmtest_eager_torch.py").write_text(
        "import torch\nfrom vlm.hookspecs import hookimpl\nvlm_api_version = '>=1.0,<2'\n"
        "@hookimpl\ndef architectures():\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import vlmtest_eager_torch

    try:
        fails(
            Conformance(vlmtest_eager_torch, tiny_qwen2), "lazy_torch_import", r"imports torch", r"inside build_model"
        )
    finally:
        import sys

        sys.modules.pop("vlmtest_eager_torch", None)
    Conformance("llama", tiny_qwen2).check_lazy_torch_import()


# -- preprocessing against a reference processor -------------------------------------------


def test_preprocessing_catches_a_text_preprocessor_that_drops_the_generation_prompt(tiny_qwen2):
    def no_generation_prompt(tokenizer):
        inner = text_preprocessor(tokenizer)

        class NoGenerationPrompt:
            def __init__(self):
                self.tokenizer = tokenizer

            def __call__(self, prompt, add_generation_prompt=True):
                return inner(prompt, add_generation_prompt=False)

        return NoGenerationPrompt()

    plugin = make_plugin("vlmtest_no_generation_prompt", build_preprocessor=no_generation_prompt)
    fails(
        Conformance(plugin, tiny_qwen2, reference_processor="transformers:AutoTokenizer"),
        "preprocessing",
        r"for chat messages the preprocessor's token ids differ from the reference processor's from position \d+",
        r"render chat messages with the checkpoint's chat template",
    )


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory) -> str:
    """A tiny InternVL checkpoint (Hugging Face layout): 56-px tiles, 1 to 6 tiles and a thumbnail."""
    from vlm_plugin_internvl.testing import write_tiny_internvl

    return str(write_tiny_internvl(tmp_path_factory.mktemp("internvl") / "hf", "hf", seed=0))


def make_internvl_plugin(name: str, preprocessor_class: type) -> ModuleType:
    """A plugin serving InternVL (above the real plugin) with ``preprocessor_class`` as its preprocessor."""
    import vlm_plugin_internvl

    def architectures():
        return ["InternVLForConditionalGeneration"]

    def match(hf_config):
        archs = getattr(hf_config, "architectures", None) or []
        return Claim(priority=10, reason="test") if "InternVLForConditionalGeneration" in archs else None

    def build_preprocessor(hf_config, model_path, tokenizer):
        return preprocessor_class(tokenizer, hf_config, model_path)

    hooks = dict(
        architectures=architectures,
        match=match,
        build_preprocessor=build_preprocessor,
        build_model=vlm_plugin_internvl.build_model,
    )
    module = ModuleType(name)
    module.vlm_api_version = ">=1.0,<2"
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def internvl_conformance(plugin, checkpoint) -> Conformance:
    from vlm_plugin_internvl.testing import load_reference_processor

    return Conformance(plugin, checkpoint, reference_processor=load_reference_processor)


def test_preprocessing_passes_for_the_internvl_plugin(tiny_internvl):
    assert internvl_conformance("internvl", tiny_internvl).check_preprocessing() is True


def test_preprocessing_catches_a_wrong_tile_order(tiny_internvl):
    """Tiles reversed (the thumbnail first): every other check passes, the pixels are the
    reference's, only their order is wrong."""
    from vlm.inputs import pixel_values_key
    from vlm_plugin_internvl.preprocess import InternVLPreprocessor

    class ReversedTiles(InternVLPreprocessor):
        def preprocess_image(self, source):
            image = super().preprocess_image(source)
            pixel_values = image.pixel_values.flip(0)
            return dataclasses.replace(image, pixel_values=pixel_values, key=pixel_values_key(pixel_values))

    conformance = internvl_conformance(make_internvl_plugin("vlmtest_reversed_tiles", ReversedTiles), tiny_internvl)
    conformance.check_images()  # placeholders and features still agree
    fails(
        conformance,
        "preprocessing",
        r"for a 17x300 RGB image the preprocessor makes the reference processor's 7 tiles but in another order",
        r"emit the tiles \(and any thumbnail\) in the reference's order",
    )


def test_preprocessing_catches_a_wrong_resample_filter(tiny_internvl):
    """Bilinear instead of the reference's bicubic: the same shapes, other pixels. (A 1x1 image
    resizes to one colour with any filter, so the first image that tells is 17x300.)"""
    from PIL import Image

    from vlm_plugin_internvl.preprocess import InternVLPreprocessor

    class Bilinear(InternVLPreprocessor):
        def _image_settings(self):
            return dataclasses.replace(super()._image_settings(), resample=Image.Resampling.BILINEAR)

    conformance = internvl_conformance(make_internvl_plugin("vlmtest_bilinear", Bilinear), tiny_internvl)
    conformance.check_images()
    fails(
        conformance,
        "preprocessing",
        r"for a 17x300 RGB image the preprocessor's pixels differ from the reference processor's by up to \d",
        r"tolerance 1e-06",
        r"same resample filter, same tile order",
    )


def test_preprocessing_catches_a_wrong_placeholder_expansion(tiny_internvl):
    """One image token too few per image (and the model told so): the images check cannot see it,
    the reference's token ids can."""
    from vlm_plugin_internvl.preprocess import InternVLPreprocessor

    class NoImageEnd(InternVLPreprocessor):
        def expand_image(self, image):
            return super().expand_image(image).removesuffix(self.end_token)

    fails(
        internvl_conformance(make_internvl_plugin("vlmtest_no_image_end", NoImageEnd), tiny_internvl),
        "preprocessing",
        r"for a 1x1 RGB image the preprocessor's token ids differ from the reference processor's from position \d+",
        r"the same start and end tokens",
    )
