"""The checks: :class:`Conformance` runs each on one plugin and one tiny checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from vlm import hookspecs
from vlm.config import load_model_config, text_config_of
from vlm.errors import InputError, PluginError
from vlm.inputs import ModelInputs, iter_image_parts
from vlm.plugin.manager import PluginInfo, get_registry
from vlm.testing.conformance.harness import Harness
from vlm.testing.conformance.inputs import (
    default_prompts,
    describe_config,
    describe_prompt,
    image_message,
    odd_images,
    probe_configs,
    random_picture,
    with_tokens_appended,
)

CHECKS = (
    "plugin_loads",
    "match",
    "architectures",
    "lazy_torch_import",
    "build_model",
    "load_weights",
    "preprocessor",
    "images",
    "preprocessing",
    "forward",
    "incremental_decoding",
    "batch_invariance",
    "greedy_parity",
)

#: Hooks every plugin implements (``architectures`` is checked separately: it is for listings).
REQUIRED_HOOKS = ("match", "build_preprocessor", "build_model")

#: How far the preprocessor's pixel values may be from the reference processor's (float32 rounding
#: of the same arithmetic in another order; a different resample filter or tile order is far above).
PIXEL_ATOL = 1e-6

#: The methods of the model protocol; VLMs add ``embed_images``.
MODEL_METHODS = ("forward", "embed_tokens", "compute_logits", "load_weights")


class ConformanceError(AssertionError):
    """A plugin breaks the contract; the message says what to change."""


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _one_thread(check: Callable[..., Any]) -> Callable[..., Any]:
    """Run a check with one torch thread: on tiny models a second thread only adds synchronisation
    (milliseconds per op when the other core is busy), and checks stay deterministic."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _copy_messages(messages: list[Any]) -> list[Any]:
    """A copy of chat messages down to the content parts (preprocessors may rewrite them in place)."""
    return [
        {**m, "content": [dict(p) for p in m["content"]] if isinstance(m.get("content"), list) else m.get("content")}
        if isinstance(m, dict)
        else m
        for m in messages
    ]


def _same_rows_reordered(got: Any, expected: Any) -> bool:
    """Whether ``got`` holds the rows (tiles, patches) of ``expected`` in another order."""
    import torch

    if got.dim() < 2 or not 1 < len(got) <= 4096:
        return False
    distance = torch.cdist(got.flatten(1)[None], expected.flatten(1)[None], p=float("inf"))[0]
    close = distance <= PIXEL_ATOL
    return bool(close.any(0).all() and close.any(1).all())


class Conformance:
    """The checks for one plugin on one tiny checkpoint; expensive pieces are built once.

    :param plugin: the plugin's name (entry-point name, plugin-file name or distribution name) or
        its module; a module that is not registered yet is registered in the process-wide
        registry (call :func:`vlm.plugin.manager.reset_registry` afterwards to forget it).
    :param checkpoint: a tiny checkpoint directory in Hugging Face layout.
    :param reference: for :meth:`check_greedy_parity`: a class with
        ``from_pretrained(path, dtype=...)`` (e.g. a transformers class), a ``"module:attr"``
        string naming one, or a callable ``path -> model``. The model is called as
        ``model(input_ids=[1, T], **reference_inputs(inputs))`` and returns ``.logits`` ``[1, T, V]``.
    :param reference_inputs: ``ModelInputs -> dict`` of extra keyword arguments for the reference
        (default: ``pixel_values``, the images' pixel values concatenated, when there are images).
    :param reference_processor: for :meth:`check_preprocessing`: a class with
        ``from_pretrained(path)`` (e.g. ``"transformers:AutoProcessor"``, or
        ``"transformers:AutoTokenizer"`` for a text-only model), a ``"module:attr"`` string naming
        one, or a callable ``path -> processor``. The processor is transformers-style:
        ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
        renders chat messages (without it the checkpoint tokenizer's template renders them) and
        ``processor(text=prompt, images=[PIL images], return_tensors="pt")`` (``images`` left out
        when there are none; ``add_special_tokens=False`` when the rendered prompt already starts
        with BOS, as transformers' processors decide, and always for a tokenizer) returns a
        mapping with ``input_ids`` ``[1, T]`` and, for images, ``pixel_values``.
    :param reference_pixels: ``outputs -> Tensor``: the reference processor's pixels in the layout
        of vlm's ``ImageInput.pixel_values`` concatenated (default: ``outputs["pixel_values"]``),
        for a processor that lays them out differently (e.g. LLaVA-NeXT's ``[images, tiles, C,
        H, W]``: ``outputs["pixel_values"].flatten(0, 1)``; the kit sends one image per prompt).
    :param foreign_configs: more configs of other families that ``match`` must decline.
    :param max_images: the most images one prompt may carry (``None``: no limit). A model trained
        with one image per conversation (CogVLM) sets 1: a prompt with more must be refused with a
        one-line :class:`~vlm.errors.InputError`, and the default prompts keep within the limit.
    :param prompts: prompts for batch invariance and parity (default: :func:`default_prompts`).
    :param new_tokens: tokens generated per prompt in batch invariance and parity.
    :param atol: tolerance on logits (float32).
    :param min_distinct_tokens: the reference's greedy output must be at least this varied, else
        parity proves little (default: ``new_tokens // 3``).
    """

    def __init__(
        self,
        plugin: str | ModuleType,
        checkpoint: str | os.PathLike,
        reference: Any = None,
        *,
        reference_inputs: Callable[[ModelInputs], dict[str, Any]] | None = None,
        reference_processor: Any = None,
        reference_pixels: Callable[[Any], Any] | None = None,
        foreign_configs: Iterable[Any] = (),
        max_images: int | None = None,
        prompts: Sequence[Any] | None = None,
        new_tokens: int = 16,
        atol: float = 1e-4,
        min_distinct_tokens: int | None = None,
    ) -> None:
        self.plugin = plugin
        self.checkpoint = Path(checkpoint)
        self.reference = reference
        self.reference_inputs = reference_inputs
        self.reference_processor = reference_processor
        self.reference_pixels = reference_pixels
        self.foreign_configs = list(foreign_configs)
        self.max_images = max_images
        self._prompts = list(prompts) if prompts is not None else None
        self.new_tokens = new_tokens
        self.atol = atol
        self.min_distinct_tokens = min_distinct_tokens if min_distinct_tokens is not None else max(1, new_tokens // 3)

    # -- the plugin ----------------------------------------------------------------------

    @property
    def registry(self):
        return get_registry()

    @functools.cached_property
    def name(self) -> str:
        """The plugin's name in the registry; fails (as :meth:`check_plugin_loads`) when not loaded."""
        registry = self.registry
        if isinstance(self.plugin, str):
            for key, info in registry.infos.items():
                if self.plugin in (key, info.name, info.distribution):
                    name = info.name
                    break
            else:
                loaded = ", ".join(sorted(registry.infos)) or "none"
                _fail(
                    f"no plugin named {self.plugin!r} is installed (plugins found: {loaded}); install it "
                    "(pip install -e .) so that its entry point in the 'vlm.models' group is found, and "
                    "check that VLM_LOAD_PLUGINS does not leave it out"
                )
        else:
            name = registry.pm.get_name(self.plugin)
            if name is None:
                name = registry.register_module(self.plugin).name
        info = registry.infos.get(name)
        if info is not None and info.error:
            _fail(f"the plugin manager refused plugin {name!r}: {info.error}")
        return name

    @property
    def info(self) -> PluginInfo:
        return self.registry.infos[self.name]

    def _hook(self, hook: str, **kwargs: Any) -> Any:
        """Call one hook of this plugin only (keyword arguments, as the core does)."""
        return self.registry.hook_of(self.name, hook)(**kwargs)

    # -- the checkpoint ------------------------------------------------------------------

    @functools.cached_property
    def model_config(self):
        return load_model_config(self.checkpoint)

    @property
    def hf_config(self) -> Any:
        return self.model_config.hf_config

    @property
    def is_vlm(self) -> bool:
        return self.model_config.is_multimodal

    @functools.cached_property
    def tokenizer(self):
        from vlm.loader import load_tokenizer

        return load_tokenizer(self.checkpoint)

    @functools.cached_property
    def preprocessor(self):
        from vlm.plugin.manager import build_preprocessor

        try:
            preprocessor = build_preprocessor(self.model_config, self.tokenizer, self.name)
        except Exception as exc:
            _fail(
                f"build_preprocessor raised {type(exc).__name__}: {exc}; it gets hf_config, model_config, "
                f"model_path ({self.checkpoint}) and tokenizer as keyword arguments and must return a "
                "preprocessor (vlm.inputs.TextPreprocessor(tokenizer) for text-only models)"
            )
        if not callable(preprocessor):
            _fail(
                f"build_preprocessor returned {type(preprocessor).__name__}, which is not callable; return an "
                "object with __call__(prompt, add_generation_prompt=True) -> vlm.inputs.ModelInputs"
            )
        return preprocessor

    @functools.cached_property
    def prompts(self) -> list[Any]:
        if self._prompts is not None:
            return self._prompts
        prompts = default_prompts(self.is_vlm)
        if self.max_images is None:
            return prompts
        return [p for p in prompts if isinstance(p, str) or len(list(iter_image_parts(p))) <= self.max_images]

    def preprocess(self, prompt: Any, what: str = "a prompt") -> ModelInputs:
        preprocessor = self.preprocessor  # fails with build_preprocessor's own message
        try:
            inputs = preprocessor(prompt)
        except Exception as exc:
            _fail(f"the preprocessor raised {type(exc).__name__} on {what}: {exc}")
        if not isinstance(inputs, ModelInputs):
            _fail(
                f"the preprocessor returned {type(inputs).__name__} for {what}; return vlm.inputs.ModelInputs "
                "(token_ids, images, image_token_id)"
            )
        return inputs

    # -- models --------------------------------------------------------------------------

    def build(self, dtype: Any = None, device: Any = None):
        """A fresh, unloaded model from the plugin's ``build_model``."""
        import torch

        from vlm.plugin.manager import build_model

        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
        try:
            model, _ = build_model(self.model_config, dtype, device, plugin=self.name)
        except Exception as exc:
            _fail(
                f"build_model raised {type(exc).__name__} for dtype={dtype} device={device}: {exc}; it gets "
                "hf_config, model_config, dtype and device as keyword arguments"
            )
        if not isinstance(model, torch.nn.Module):
            _fail(f"build_model returned {type(model).__name__}; return a torch.nn.Module")
        return model

    def checkpoint_tensors(self, meta: bool = False):
        from vlm.loader import checkpoint_files, iter_checkpoint

        return iter_checkpoint(checkpoint_files(self.checkpoint), meta=meta, progress=False)

    def load(self, dtype: Any = None):
        """Build and load a model as the engine does (:func:`vlm.loader.load_model`), verifying that
        every tensor and parameter is accounted for."""
        import torch

        from vlm.loader import load_model
        from vlm.nn import LoadReport

        model = self.build(dtype)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.fill_(float("nan"))  # whatever load_weights does not write stays NaN
        names = [name for name, _ in self.checkpoint_tensors(meta=True)]
        read: list[str] = []

        def counted():
            for name, tensor in self.checkpoint_tensors():
                read.append(name)
                yield name, tensor

        def verify(model: Any, report: Any) -> None:
            if not isinstance(report, LoadReport):
                _fail(
                    f"load_weights returned {type(report).__name__}; return the vlm.nn.LoadReport of "
                    "load_weights_by_mapping / load_with_language_model so that the core can report mismatches"
                )
            if len(read) < len(names):
                _fail(
                    f"load_weights read only {len(read)} of the checkpoint's {len(names)} tensors (next unread: "
                    f"{names[len(read)]}); iterate over every (name, tensor) it is given"
                )
            problems = []
            if report.unexpected:
                problems.append(
                    f"load_weights left these checkpoint tensors unused: {_short_list(report.unexpected)}; map them "
                    "in load_weights (a WeightMapping for shards of a fused parameter, rename= for other names) or "
                    "skip them on purpose with ignore=[regex]"
                )
            if report.missing:
                problems.append(
                    f"these model parameters got no checkpoint tensor: {_short_list(report.missing)}; map the "
                    "checkpoint names that hold them in load_weights, or do not create the parameters"
                )
            if report.mismatched:
                problems.append(
                    f"these checkpoint tensors do not fit their parameters' shapes: {_short_list(report.mismatched)}; "
                    "build the layers with the sizes in hf_config"
                )
            if problems:
                _fail("; ".join(problems))
            unwritten = [
                name
                for name, param in model.named_parameters()
                if param.is_floating_point() and param.numel() and bool(torch.isnan(param).any())
            ]
            if unwritten:
                _fail(
                    f"load_weights reported success but never wrote (all of) these parameters: "
                    f"{_short_list(unwritten)}; every element must come from the checkpoint: load through each "
                    "parameter's weight_loader (load_weights_by_mapping does)"
                )

        try:
            loaded = load_model(
                self.model_config,
                dtype or torch.float32,
                torch.device("cpu"),
                self.name,
                model=model,
                weights=counted(),
                strict=False,
                verify=verify,
            )
        except ConformanceError:
            raise
        except Exception as exc:
            _fail(f"load_weights raised {type(exc).__name__} (after reading {len(read)} tensors): {exc}")
        return loaded.model

    @functools.cached_property
    def model(self):
        """The float32 model, loaded and prepared as the engine prepares it."""
        return self.load()

    def harness(self, model: Any = None, dtype: Any = None) -> Harness:
        import torch

        return Harness(model if model is not None else self.model, self.model_config.text, dtype or torch.float32)

    @functools.cached_property
    def llm(self):
        from vlm import LLM

        return LLM(str(self.checkpoint), plugin=self.name, max_num_seqs=8)

    # -- checks --------------------------------------------------------------------------

    def check_plugin_loads(self) -> None:
        info = self.info  # resolving the name fails with the plugin manager's reason
        missing = [hook for hook in REQUIRED_HOOKS if hook not in info.hooks]
        if missing:
            _fail(
                f"plugin {self.name!r} implements {info.hooks or 'no hooks'} but not {missing}; add @hookimpl "
                "functions with exactly these names (see vlm.hookspecs)"
            )
        if "architectures" not in info.hooks:
            _fail(
                f"plugin {self.name!r} does not implement architectures(); add it (returning the architecture "
                "names it serves) so that `vlmrun plugins` can list them without importing torch"
            )
        if info.api_version is None:
            _fail(
                f"plugin {self.name!r} does not declare the plugin API versions it supports; add "
                f'vlm_api_version = ">={hookspecs.API_VERSION},<{int(float(hookspecs.API_VERSION)) + 1}" to the plugin module'
            )

    def check_match(self) -> None:
        from vlm.hookspecs import Claim

        config = self.hf_config
        try:
            results = [r for r in self._hook("match", hf_config=config) if r not in (None, False)]
        except Exception as exc:
            _fail(f"match() raised {type(exc).__name__} on the checkpoint's config ({describe_config(config)}): {exc}")
        if not results:
            _fail(
                f"match() declined the config of the checkpoint in {self.checkpoint} ({describe_config(config)}); "
                "return Claim(reason=...) when hf_config.architectures or hf_config.model_type is one this plugin serves"
            )
        for result in results:
            if not (result is True or isinstance(result, Claim)):
                _fail(
                    f"match() returned {result!r}; return vlm.hookspecs.Claim(...) (or True) to claim, None to decline"
                )
        try:
            chosen, _ = self.registry.choose(config)
        except PluginError as exc:
            _fail(
                f"the core cannot pick a plugin for this checkpoint: {exc}. Decline configs that are not "
                "yours, or give your Claim a higher priority"
            )
        if chosen != self.name:
            _fail(
                f"plugin {chosen!r} outranks {self.name!r} for this checkpoint ({describe_config(config)}); return "
                "Claim(priority=...) above theirs if this plugin should serve it"
            )
        for probe in probe_configs() + self.foreign_configs:
            try:
                claimed = [r for r in self._hook("match", hf_config=probe) if r not in (None, False)]
            except Exception as exc:
                _fail(
                    f"match() raised {type(exc).__name__} on a config of another family ({describe_config(probe)}): "
                    f"{exc}; every plugin sees every config: read fields with "
                    "getattr(hf_config, 'architectures', None) or [] and decline what is not yours"
                )
            if claimed:
                _fail(
                    f"match() claimed a config of another family ({describe_config(probe)}); decline (return None) "
                    "unless hf_config.architectures or hf_config.model_type is one this plugin serves, or it takes "
                    "other families' models away from their plugins"
                )
        if self.is_vlm:
            text = text_config_of(config)
            if any(r not in (None, False) for r in self._hook("match", hf_config=text)):
                _fail(
                    f"match() also claims this checkpoint's nested text config ({describe_config(text)}); the core "
                    "asks every plugin for a VLM's language model (vlm.plugin.build_language_model), so decline "
                    "configs whose architectures / model_type are not yours"
                )
            try:
                self.registry.choose(text)
            except PluginError as exc:
                _fail(
                    f"no plugin serves this VLM's nested text config ({describe_config(text)}): {exc}. Install the "
                    "language-model plugin and list it in the plugin's dependencies"
                )

    def check_architectures(self) -> None:
        results = self._hook("architectures")
        listed = [name for result in results for name in (result or [])]
        if not all(isinstance(name, str) for name in listed):
            _fail(f"architectures() must return a list of strings, got {results!r}")
        own = list(getattr(self.hf_config, "architectures", None) or [])
        if own and not any(name in listed for name in own):
            _fail(
                f"architectures() returns {listed} but not {own}, the architecture of the checkpoint that match() "
                "claims; list every architecture this plugin serves (`vlmrun plugins` shows that list)"
            )

    def check_lazy_torch_import(self) -> None:
        info = self.info
        if isinstance(self.plugin, ModuleType):
            module = self.plugin.__name__
        elif info.source == "entry point":
            module = info.location.split(":")[0].strip()
        else:
            return  # a plugin file is imported under a generated name; nothing to import by name
        try:
            if importlib.util.find_spec(module) is None:
                return
        except (ImportError, ValueError):  # a parent package that cannot be found, a module without a spec
            return
        code = (
            "import importlib, sys; importlib.import_module(sys.argv[1]); "
            "print(','.join(m for m in ('torch',) if m in sys.modules))"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        result = subprocess.run(
            [sys.executable, "-c", code, module], capture_output=True, text=True, env=env, timeout=120
        )
        if result.returncode != 0:
            _fail(f"importing {module} in a fresh interpreter failed: {result.stderr.strip().splitlines()[-1:]}")
        if result.stdout.strip():
            _fail(
                f"importing the plugin module {module} imports torch; import torch (and the modules that import it, "
                "such as your model file) inside build_model / build_preprocessor, so that `vlmrun plugins` and "
                "start-up stay fast"
            )

    @_one_thread
    def check_build_model(self) -> None:
        import torch

        model = self.build(torch.bfloat16, "meta")
        methods = MODEL_METHODS + (("embed_images",) if self.is_vlm else ())
        missing = [m for m in methods if not callable(getattr(model, m, None))]
        if missing:
            _fail(
                f"the model lacks {missing} of the model protocol ({', '.join(methods)}); "
                + (
                    "a VLM's model implements embed_images(images) -> one [num_tokens, hidden] tensor per image; "
                    if "embed_images" in missing
                    else ""
                )
                + "see docs/writing-a-plugin.md"
            )
        off_device = [n for n, p in model.named_parameters() if p.device.type != "meta"]
        if off_device:
            _fail(
                f"build_model(device=meta) left these parameters on another device: {_short_list(off_device)}; "
                "pass device= to every layer (vlmrun check builds models on the meta device)"
            )
        wrong_dtype = [
            f"{n} ({p.dtype})"
            for n, p in model.named_parameters()
            if p.is_floating_point() and p.dtype != torch.bfloat16
        ]
        if wrong_dtype:
            _fail(
                f"build_model(dtype=torch.bfloat16) made these parameters in another dtype: {_short_list(wrong_dtype)}; "
                "pass dtype= to every vlm.nn layer and torch parameter"
            )
        try:
            report = model.load_weights(self.checkpoint_tensors(meta=True))
        except Exception as exc:
            _fail(
                f"load_weights raised {type(exc).__name__} on the meta device (what `vlmrun check` does): {exc}; "
                "load_weights must not read tensor values, only copy them into parameters"
            )
        if getattr(report, "ok", False) is not True:
            self.check_load_weights()  # the detailed message
            _fail("load_weights reports a mismatch on the meta device (what `vlmrun check` does) but not on the CPU")

    @_one_thread
    def check_load_weights(self) -> None:
        self.model  # noqa: B018  (loading verifies the report and the parameters)

    @_one_thread
    def check_preprocessor(self) -> None:
        preprocessor = self.preprocessor
        if getattr(preprocessor, "tokenizer", None) is None:
            _fail("the preprocessor has no .tokenizer attribute; keep the tokenizer build_preprocessor was given on it")
        vocab = self.model_config.text.vocab_size
        prompts: list[tuple[str, Any]] = [
            ("a plain string prompt", "Hello there"),
            ("a long string prompt", "word " * 40),
        ]
        if getattr(self.tokenizer, "chat_template", None):
            prompts += [
                ("chat messages", [{"role": "user", "content": "Hi, how are you?"}]),
                ("chat messages with text parts", [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]),
            ]
        for what, prompt in prompts:
            inputs = self.preprocess(prompt, what)
            ids = inputs.token_ids
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                _fail(f"the preprocessor returned token_ids={ids[:10]!r} for {what}; return a non-empty list of ints")
            if not all(0 <= t < vocab for t in ids):
                _fail(f"the preprocessor returned token ids outside [0, {vocab}) for {what}: {ids[:20]}")
            if inputs.images:
                _fail(f"the preprocessor returned {len(inputs.images)} image(s) for {what}, which has none")
        ids = [5, 6, 7, 8]
        inputs = self.preprocess(list(ids), "a token-id prompt")
        if inputs.token_ids != ids:
            _fail(f"a token-id prompt {ids} came back as {inputs.token_ids}; pass token ids through unchanged")

    @_one_thread
    def check_images(self) -> None:
        if not self.is_vlm:
            picture = random_picture(0, (32, 32))
            try:
                self.preprocessor(image_message(picture))
            except InputError:
                return
            except Exception as exc:
                _fail(
                    f"a text-only model's preprocessor raised {type(exc).__name__} on an image part: {exc}; refuse "
                    "images with vlm.errors.InputError (vlm.inputs.TextPreprocessor does)"
                )
            _fail(
                "a text-only model's preprocessor accepted an image part; refuse images with vlm.errors.InputError "
                "(vlm.inputs.TextPreprocessor does) instead of dropping them silently"
            )
        import torch

        hidden = self.model_config.text.hidden_size
        cases = [(f"a {label} image", image_message(image), 1) for label, image in odd_images()]
        pair = (random_picture(21, (90, 50)), random_picture(22, (50, 90)))
        if self.max_images is None or self.max_images >= 2:
            cases.append(("two images in one prompt", image_message(*pair), 2))
        else:
            self._check_image_limit(image_message(*pair))
        for what, messages, count in cases:
            inputs = self.preprocess(messages, what)
            self._check_placeholders(inputs, what, count)
            try:
                with torch.inference_mode():
                    features = self.model.embed_images(inputs.images)
            except Exception as exc:
                _fail(f"embed_images raised {type(exc).__name__} on the pixels of {what}: {exc}")
            features = list(features)
            if len(features) != len(inputs.images):
                _fail(
                    f"embed_images returned {len(features)} tensors for {len(inputs.images)} images; return one per image"
                )
            for image, rows in zip(inputs.images, features):
                if rows.dim() != 2 or rows.shape[0] != image.num_tokens:
                    _fail(
                        f"for {what} the preprocessor announces {image.num_tokens} placeholder tokens "
                        f"(ImageInput.num_tokens) but embed_images returns {tuple(rows.shape)} features; the "
                        "preprocessor must expand the image placeholder to exactly as many tokens as the model "
                        "makes features of those pixels"
                    )
                if rows.shape[1] != hidden:
                    _fail(
                        f"embed_images returns features of width {rows.shape[1]} for {what}; they replace "
                        f"token embeddings, so project them to the language model's hidden_size ({hidden})"
                    )
                if not bool(torch.isfinite(rows).all()):
                    _fail(f"embed_images returns non-finite features for {what}")
        first = self.preprocess(image_message(pair[0]), "an image")
        again = self.preprocess(image_message(pair[0].copy()), "the same image again")
        other = self.preprocess(image_message(pair[1]), "another image")
        if first.images[0].key != again.images[0].key or first.images[0].key == other.images[0].key:
            _fail(
                "ImageInput.key must be a content hash of the pixel values (vlm.inputs.pixel_values_key): the "
                "engine shares image features and cached prefixes between images with equal keys"
            )

    def _check_image_limit(self, messages: list[Any]) -> None:
        """More images than ``max_images`` must be a one-line InputError, not a wrong prompt."""
        try:
            self.preprocessor(messages)
        except InputError as exc:
            if "\n" in str(exc).strip():
                _fail(f"the refusal of a prompt with too many images is not one line: {exc!r}")
            return
        except Exception as exc:
            _fail(
                f"the preprocessor raised {type(exc).__name__} on a prompt with more than {self.max_images} "
                f"image(s): {exc}; refuse it with vlm.errors.InputError naming the limit"
            )
        _fail(
            f"the preprocessor accepted a prompt with more than max_images={self.max_images} image(s); refuse it "
            "with vlm.errors.InputError naming the limit, or raise max_images"
        )

    # -- preprocessing against a reference processor ---------------------------------------

    def load_reference_processor(self) -> Any:
        """The reference processor for this checkpoint (see ``reference_processor``)."""
        processor = self.reference_processor
        if isinstance(processor, str):
            module, _, attr = processor.partition(":")
            processor = getattr(importlib.import_module(module), attr)
        try:
            if hasattr(processor, "from_pretrained"):
                return processor.from_pretrained(str(self.checkpoint))
            return processor(str(self.checkpoint))
        except Exception as exc:
            _fail(
                f"the reference processor {self.reference_processor!r} could not be loaded for {self.checkpoint}: "
                f"{type(exc).__name__}: {exc}; give reference_processor as a class with from_pretrained(path) or a "
                "callable path -> processor"
            )

    def _preprocessing_cases(self) -> list[tuple[str, Any, list[Any]]]:
        """``(what, prompt, images)``: what the preprocessor and the reference processor both get."""
        if not self.is_vlm:
            cases: list[tuple[str, Any, list[Any]]] = [
                (f"the string prompt {describe_prompt(prompt)}", prompt, []) for prompt in default_prompts(False)
            ]
            if getattr(self.tokenizer, "chat_template", None):
                conversation = [
                    {"role": "user", "content": "Hi, how are you?"},
                    {"role": "assistant", "content": "Fine, thanks."},
                    {"role": "user", "content": "Count to three."},
                ]
                cases += [
                    ("chat messages", conversation[:1], []),
                    ("a conversation of three turns", conversation, []),
                ]
            return cases
        text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello, no picture today."}]}]
        return [
            ("a plain string prompt", "Hello there, plain text.", []),
            ("chat messages without an image", text_only, []),
            *((f"a {label} image", image_message(image), [image]) for label, image in odd_images()),
        ]

    def _reference_outputs(self, processor: Any, prompt: Any, images: list[Any], what: str) -> Any:
        """The reference processor's outputs for ``prompt``: chat messages are rendered with its
        chat template, then the text and images go through ``processor(...)``."""
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        try:
            if isinstance(prompt, str):
                text = prompt
            else:
                render = getattr(processor, "apply_chat_template", None) or self.tokenizer.apply_chat_template
                text = render(_copy_messages(prompt), tokenize=False, add_generation_prompt=True)
                # transformers: a tokenizer's chat template writes the special tokens itself; a
                # processor adds them unless the rendered prompt already starts with BOS
                tokenizer = getattr(processor, "tokenizer", None)
                bos = getattr(tokenizer, "bos_token", None)
                if tokenizer is None or (bos and text.startswith(bos)):
                    kwargs["add_special_tokens"] = False
            if images:
                kwargs["images"] = images
            return processor(text=text, **kwargs)
        except Exception as exc:
            _fail(
                f"the reference processor raised {type(exc).__name__} on {what}: {exc}; it is called as "
                "processor(text=..., images=[...], return_tensors='pt') after apply_chat_template(messages, "
                "tokenize=False, add_generation_prompt=True) (see Conformance's reference_processor)"
            )

    def _describe_ids(self, ids: list[int]) -> str:
        try:
            return f"{ids} = {self.tokenizer.decode(ids)!r}"
        except Exception:
            return str(ids)

    def check_preprocessing(self) -> bool:
        """The preprocessor's token ids equal the reference processor's, and its pixel values (the
        images' ``pixel_values`` concatenated) equal the reference's within :data:`PIXEL_ATOL`, for
        text prompts and each of :func:`odd_images`; False when there is no reference processor.

        A text-only plugin is checked on string prompts and chat messages (with a transformers
        tokenizer as the reference, e.g. ``"transformers:AutoTokenizer"``).
        """
        if self.reference_processor is None:
            return False
        import torch

        processor = self.load_reference_processor()
        for what, prompt, images in self._preprocessing_cases():
            outputs = self._reference_outputs(processor, prompt, images, what)
            expected_ids = outputs["input_ids"]
            expected_ids = expected_ids.tolist() if hasattr(expected_ids, "tolist") else list(expected_ids)
            if expected_ids and isinstance(expected_ids[0], list):
                if len(expected_ids) != 1:
                    _fail(f"the reference processor returned {len(expected_ids)} rows of input_ids for {what}; one")
                expected_ids = expected_ids[0]
            inputs = self.preprocess(_copy_messages(prompt) if isinstance(prompt, list) else prompt, what)
            got = inputs.token_ids
            if got != expected_ids:
                at = next(
                    (i for i, (a, b) in enumerate(zip(got, expected_ids)) if a != b), min(len(got), len(expected_ids))
                )
                _fail(
                    f"for {what} the preprocessor's token ids differ from the reference processor's from position "
                    f"{at} (vlm: {len(got)} ids, then {self._describe_ids(got[at : at + 6])}; reference: "
                    f"{len(expected_ids)} ids, then {self._describe_ids(expected_ids[at : at + 6])}); render chat "
                    "messages with the checkpoint's chat template, add BOS only where the reference does, and expand "
                    "each image placeholder into the reference's tokens (as many per image, the same start and end "
                    "tokens)"
                )
            if not images:
                continue
            self._check_placeholders(inputs, what, len(images))
            if self.reference_pixels is not None:
                expected = self.reference_pixels(outputs)
            else:
                expected = outputs.get("pixel_values") if hasattr(outputs, "get") else None
            if expected is None:
                _fail(
                    f"the reference processor returned no pixel_values for {what}; give reference_pixels "
                    "(outputs -> Tensor) to pick its pixels"
                )
            expected = torch.as_tensor(expected)
            pixels = torch.cat([image.pixel_values for image in inputs.images])
            if tuple(pixels.shape) != tuple(expected.shape):
                _fail(
                    f"for {what} the preprocessor's pixel values (ImageInput.pixel_values concatenated) have shape "
                    f"{tuple(pixels.shape)} and the reference processor's {tuple(expected.shape)}; resize to the "
                    "reference's size and make the same tiles or patches (as many, with the same thumbnail, in the "
                    "same layout)"
                )
            if not pixels.numel():
                continue
            pixels, expected = pixels.double(), expected.double()
            diff = (pixels - expected).abs().max().item()
            if not diff <= PIXEL_ATOL:
                if _same_rows_reordered(pixels, expected):
                    _fail(
                        f"for {what} the preprocessor makes the reference processor's {len(pixels)} tiles but in "
                        "another order; emit the tiles (and any thumbnail) in the reference's order"
                    )
                _fail(
                    f"for {what} the preprocessor's pixels differ from the reference processor's by up to {diff:.3g} "
                    f"(tolerance {PIXEL_ATOL:g}): resize and normalise as the reference does (same resample filter, "
                    "same tile order, same RGB conversion, rescale factor, mean and std)"
                )
        return True

    def _check_placeholders(self, inputs: ModelInputs, what: str, expected_images: int) -> None:
        import torch

        if len(inputs.images) != expected_images:
            _fail(
                f"the preprocessor returned {len(inputs.images)} ImageInput(s) for {what} ({expected_images} image "
                "part(s)); return one per image part, in prompt order"
            )
        if inputs.image_token_id is None:
            _fail(
                "the preprocessor returned images but ModelInputs.image_token_id is None; set it to the placeholder "
                "token whose embeddings the image features replace"
            )
        for image in inputs.images:
            if not isinstance(image.pixel_values, torch.Tensor):
                _fail(f"ImageInput.pixel_values is a {type(image.pixel_values).__name__}; make it a torch.Tensor")
            if not isinstance(image.num_tokens, int) or image.num_tokens <= 0:
                _fail(f"ImageInput.num_tokens is {image.num_tokens!r} for {what}; it must be a positive int")
            if not isinstance(image.key, str) or not image.key:
                _fail("ImageInput.key is empty; set it to vlm.inputs.pixel_values_key(pixel_values)")
        count = inputs.token_ids.count(inputs.image_token_id)  # type: ignore[arg-type]  # checked above
        expected = sum(image.num_tokens for image in inputs.images)
        if count != expected:
            _fail(
                f"for {what} the prompt holds {count} placeholder tokens (id {inputs.image_token_id}) but "
                f"ImageInput.num_tokens adds up to {expected}; expand each image's placeholder to exactly "
                "num_tokens tokens (and keep the placeholder token out of the rest of the prompt)"
            )

    def _probe(self) -> ModelInputs:
        """A prompt for the forward checks: with an image for a VLM."""
        if self.is_vlm:
            inputs = self.preprocess(image_message(random_picture(5, (70, 40)), text="What is this? Tell me."))
            self._check_placeholders(inputs, "a 70x40 RGB image", 1)
            return inputs
        return self.preprocess("The conformance kit checks this prompt, token by token.")

    @_one_thread
    def check_forward(self) -> None:
        import torch

        text = self.model_config.text
        inputs = self._probe()
        length = len(inputs.token_ids)
        for dtype in (torch.float32, torch.bfloat16):
            model = self.model if dtype == torch.float32 else self.load(dtype)
            harness = self.harness(model, dtype)
            seq = harness.sequence(inputs, extra_tokens=1)
            try:
                input_ids, hidden = harness.step(prefills=[(seq, length)])
            except ConformanceError:
                raise
            except Exception as exc:
                _fail(f"forward raised {type(exc).__name__} in {dtype} on a prefill of {length} tokens: {exc}")
            expect = (length, text.hidden_size)
            if tuple(hidden.shape) != expect:
                _fail(
                    f"forward returned hidden states of shape {tuple(hidden.shape)} for {length} tokens; return "
                    f"[num_tokens, hidden_size] = {list(expect)}: one row per token of the flat batch"
                )
            if hidden.dtype != dtype:
                _fail(f"forward returned {hidden.dtype} hidden states from a {dtype} model; keep the model's dtype")
            logits = harness.logits(hidden)
            if tuple(logits.shape) != (length, text.vocab_size):
                _fail(
                    f"compute_logits returned shape {tuple(logits.shape)} for {length} hidden states; return "
                    f"[rows, vocab_size] = {[length, text.vocab_size]}"
                )
            if logits.dtype != torch.float32:
                _fail(f"compute_logits returned {logits.dtype}; return float32 logits (e.g. self.lm_head(h).float())")
            if not bool(torch.isfinite(logits).all()):
                _fail(f"compute_logits returned non-finite values in {dtype}")
            with torch.inference_mode():
                embeds = model.embed_tokens(input_ids)
            if tuple(embeds.shape) != expect or embeds.dtype != dtype:
                _fail(
                    f"embed_tokens returned {tuple(embeds.shape)} {embeds.dtype} for {length} ids; return "
                    f"[num_tokens, hidden_size] = {list(expect)} in the model's dtype"
                )
            # decode one token: [1, hidden]
            seq.output_token_ids.append(inputs.token_ids[-1])
            _, decoded = harness.step(decodes=[seq])
            if tuple(decoded.shape) != (1, text.hidden_size):
                _fail(f"forward returned {tuple(decoded.shape)} for one decode token; return [1, {text.hidden_size}]")
        if not self.is_vlm:
            # a VLM built on this language model hands it image features through inputs_embeds:
            # tokens A with the embeddings of tokens B must give what tokens B give
            harness = self.harness()
            other = [(t * 7 + 3) % min(text.vocab_size, 256) for t in inputs.token_ids]
            plain = harness.sequence(dataclasses.replace(inputs, token_ids=other))
            _, expected_hidden = harness.step(prefills=[(plain, length)])
            swapped = harness.sequence(inputs)
            _, got = harness.step(prefills=[(swapped, length)], embeds_of=other)
            if not torch.allclose(got, expected_hidden, atol=self.atol, rtol=0):
                _fail(
                    "forward(input_ids, ..., inputs_embeds=E) ignores E: when inputs_embeds is given, use it instead "
                    "of embedding input_ids (a VLM built on this language model passes image features that way)"
                )

    @_one_thread
    def check_incremental_decoding(self, steps: int = 6) -> None:
        import torch

        inputs = self._probe()
        length = len(inputs.token_ids)
        rng = torch.Generator().manual_seed(0)
        vocab = min(self.model_config.text.vocab_size, 256)
        continuation = [int(t) for t in torch.randint(0, vocab, (steps,), generator=rng)]
        continuation = [t if t != inputs.image_token_id else 0 for t in continuation]
        full = with_tokens_appended(inputs, continuation)
        harness = self.harness()

        whole = harness.sequence(full)
        _, hidden = harness.step(prefills=[(whole, length + steps)])
        expected = harness.logits(hidden[length - 1 :])  # after the prompt, then after each new token

        seq = harness.sequence(inputs, extra_tokens=steps)
        _, hidden = harness.step(prefills=[(seq, length)])
        got = [harness.logits(hidden[-1:])[0]]
        for token in continuation:
            seq.output_token_ids.append(token)
            _, hidden = harness.step(decodes=[seq])
            got.append(harness.logits(hidden)[0])
        for index, row in enumerate(got):
            diff = (row - expected[index]).abs().max().item()
            if not diff <= self._tolerance(expected[index]):
                where = "the prompt's prefill" if index == 0 else f"decode step {index}"
                _fail(
                    f"incremental decoding disagrees with a full forward: after {where} of a {length}-token prompt the "
                    f"last position's logits differ by {diff:.3g}; read and write the KV cache only through "
                    "vlm.nn.Attention with the batch it is given, take positions from the `positions` argument (not "
                    "0..T-1 per step), and keep no state between forward calls"
                )

        split = max(1, length // 2)
        chunked = harness.sequence(full)
        harness.step(prefills=[(chunked, split)])
        _, hidden = harness.step(prefills=[(chunked, length + steps - split)])
        diff = (harness.logits(hidden[-1:])[0] - expected[-1]).abs().max().item()
        if not diff <= self._tolerance(expected[-1]):
            _fail(
                f"a prefill in two chunks ({split} + {length + steps - split} tokens) disagrees with one prefill: the "
                f"last logits differ by {diff:.3g}; attention must go through vlm.nn.Attention (which continues a "
                "cached prefix) and positions must come from the `positions` argument"
            )

    def _tolerance(self, reference_row) -> float:
        return self.atol * max(1.0, float(reference_row.abs().max()))

    def _generate(self, prompts: Sequence[Any]) -> list[tuple[list[int], Any]]:
        """vlm's greedy tokens and the logits each was sampled from, per prompt (batched together)."""
        from vlm import SamplingParams
        from vlm.testing.logits import generate_with_logits

        # ignore_eos, not min_tokens: min_tokens masks EOS, and the tokens must be the raw logits' argmax
        params = SamplingParams(temperature=0, max_tokens=self.new_tokens, ignore_eos=True)
        return generate_with_logits(self.llm, list(prompts), params)

    @functools.cached_property
    def alone(self) -> list[tuple[list[int], Any]]:
        return [self._generate([prompt])[0] for prompt in self.prompts]

    @_one_thread
    def check_batch_invariance(self) -> None:
        prompts = self.prompts
        batched = self._generate(prompts)
        for index, ((tokens, logits), (alone_tokens, alone_logits)) in enumerate(zip(batched, self.alone)):
            step = next((i for i, (a, b) in enumerate(zip(tokens, alone_tokens)) if a != b), None)
            diff = (logits[: len(alone_logits)] - alone_logits[: len(logits)]).abs().max().item()
            if step is not None or not diff <= self._tolerance(alone_logits):
                _fail(
                    f"prompt {index} ({describe_prompt(prompts[index])}) gives different "
                    + (f"tokens (from step {step})" if step is not None else "logits")
                    + f" batched with {len(prompts) - 1} others than alone (max logit difference {diff:.3g}); treat "
                    "every token of the flat batch independently: no reductions over the token dimension, no "
                    "positions assumed to start at 0, attention only through vlm.nn.Attention"
                )

    def load_reference(self):
        import torch

        reference = self.reference
        if isinstance(reference, str):
            module, _, attr = reference.partition(":")
            reference = getattr(importlib.import_module(module), attr)
        if hasattr(reference, "from_pretrained"):
            model = reference.from_pretrained(str(self.checkpoint), dtype=torch.float32)
        else:
            model = reference(str(self.checkpoint))
        return model.eval() if hasattr(model, "eval") else model

    def _reference_logits(self, model: Any, inputs: ModelInputs, tokens: list[int]) -> Any:
        """The reference's logits after the prompt and after each of ``tokens`` but the last
        (teacher-forced: one forward over the prompt and vlm's greedy tokens)."""
        import torch

        extra: dict[str, Any] = {}
        if self.reference_inputs is not None:
            extra = dict(self.reference_inputs(inputs))
        elif inputs.images:
            extra = {"pixel_values": torch.cat([image.pixel_values for image in inputs.images])}
        ids = list(inputs.token_ids) + list(tokens[:-1])
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), **extra)
        logits = getattr(out, "logits", out)
        return logits[0, len(inputs.token_ids) - 1 :].float()

    @_one_thread
    def check_greedy_parity(self) -> bool:
        """vlm's greedy tokens and their logits equal the reference's; False when there is no reference.

        The reference runs teacher-forced on vlm's tokens, so each step's logits are compared on the
        same prefix; a token may differ from the reference's argmax only where the two are tied
        within the tolerance.
        """
        if self.reference is None:
            return False
        model = self.load_reference()
        for index, (prompt, (tokens, logits)) in enumerate(zip(self.prompts, self.alone)):
            inputs = self.llm.engine.preprocess(prompt)
            ref_logits = self._reference_logits(model, inputs, tokens)
            what = f"prompt {index} ({describe_prompt(prompt)})"
            if tuple(ref_logits.shape) != tuple(logits.shape):
                _fail(
                    f"for {what} the reference's logits have shape {tuple(ref_logits.shape)} and vlm's "
                    f"{tuple(logits.shape)}; the vocabulary sizes must agree"
                )
            ref_tokens = ref_logits.argmax(-1).tolist()
            if len(set(ref_tokens)) < self.min_distinct_tokens:
                _fail(
                    f"the reference's greedy output for {what} is degenerate ({len(set(ref_tokens))} distinct tokens "
                    f"in {len(ref_tokens)}): parity on it proves little; write the tiny checkpoint with larger random "
                    "weights (e.g. normal std 0.3, norm weights around 1)"
                )
            tolerance = self._tolerance(ref_logits)
            for step, row in enumerate(ref_logits):
                diff = (logits[step] - row).abs().max().item()
                tied = row[tokens[step]].item() >= row.max().item() - tolerance
                if not diff <= tolerance or not tied:
                    _fail(
                        f"greedy decoding of {what} differs from the reference at step {step}: vlm picks token "
                        f"{tokens[step]}, the reference {ref_tokens[step]}, and the logits differ by up to {diff:.3g} "
                        f"(tolerance {tolerance:.3g}); compare the model with the reference layer by layer (norm eps, "
                        "rotary style, activation, weight mapping, image placeholder expansion)"
                    )
        return True

    def run_all(self) -> None:
        """Every check, in order; the first failure raises."""
        for check in CHECKS:
            getattr(self, f"check_{check}")()


def run_conformance(
    plugin: str | ModuleType, checkpoint: str | os.PathLike, reference: Any = None, **options: Any
) -> Conformance:
    """Run every check on ``plugin`` with ``checkpoint``; returns the :class:`Conformance` used."""
    conformance = Conformance(plugin, checkpoint, reference, **options)
    conformance.run_all()
    return conformance
