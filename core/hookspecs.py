"""The plugin contract of vlm: every hook a model-family plugin can implement.

This file is the documentation of the contract. A plugin is a module (or an object) holding
functions decorated with :data:`hookimpl` whose names match the specs below. The core finds
plugins through ``importlib.metadata.entry_points(group="vlm.models")``, registers each in one
``pluggy.PluginManager("vlm")`` and calls hooks **with keyword arguments only**, so an
implementation may accept fewer arguments than its spec and the specs can grow without breaking
plugins.

A plugin module declares the range of contract versions it was written for::

    vlm_api_version = ">=1.0,<2"

and the core refuses a plugin whose range does not contain :data:`API_VERSION`.

Plugin modules must import torch lazily (inside ``build_model`` / ``build_preprocessor``):
``vlmrun plugins`` imports every plugin and calls :func:`architectures` without importing torch.

Minimal plugin::

    from vlm.plugin import Claim, hookimpl

    vlm_api_version = ">=1.0,<2"

    @hookimpl
    def architectures():
        return ["MyForCausalLM"]

    @hookimpl
    def match(hf_config):
        if "MyForCausalLM" in (hf_config.architectures or []):
            return Claim(reason="architecture MyForCausalLM")

    @hookimpl
    def build_model(hf_config, dtype, device):
        from .model import MyForCausalLM   # torch is imported here, not at module import
        return MyForCausalLM(hf_config, dtype=dtype, device=device)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # imported for annotations only: this module must not import torch
    import torch

    from vlm.config import ModelConfig
    from vlm.grounding import GroundedBox
    from vlm.inputs import ModelInputs, Preprocessor

#: Version of this contract. Bump the major version when a spec changes incompatibly.
#:
#: - 1.0: ``architectures``, ``match``, ``build_preprocessor``, ``build_model``.
#: - 1.1: component registries (``vlm.registry``: vision towers, projectors, patch embeddings,
#:   activations) and config builders (``vlm.plugin.ConfigBuilder`` in ``CONFIG_BUILDERS``), which
#:   read a config.json in a plugin's own naming before the core validates it. No hook changed:
#:   plugins written for 1.0 (``>=1.0,<2``) keep working.
#: - 1.2: the optional ``parse_grounding`` hook: a plugin parses the boxes its model writes in an
#:   answer (grounding left the core). No other hook changed: plugins written for 1.0 and 1.1 keep
#:   working, and a family without the hook gives no boxes.
API_VERSION = "1.2"

#: The name of the module attribute where a plugin declares the versions it supports.
API_VERSION_ATTRIBUTE = "vlm_api_version"

hookspec = pluggy.HookspecMarker("vlm")
hookimpl = pluggy.HookimplMarker("vlm")


@dataclass(frozen=True)
class Claim:
    """A plugin's answer to :func:`match`: "I serve this config".

    :param priority: higher wins; two claims at the same highest priority are an error that asks
        the user to choose with ``--plugin NAME``. Generic fallbacks use negative priorities.
    :param reason: a few words for ``vlmrun which`` (e.g. ``"architecture Qwen2ForCausalLM"``).
    """

    priority: int = 0
    reason: str = ""


def claim_by_architecture(hf_config: Any, architectures: dict[str, str]) -> Claim | None:
    """The usual ``match``: claim a config whose ``architectures`` (or, for a nested text config
    that names none, whose ``model_type``) is listed in ``{architecture: model_type}``."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in architectures:
            return Claim(reason=f"architecture {arch}")
    model_type = getattr(hf_config, "model_type", None)
    if model_type in architectures.values():
        return Claim(reason=f"model_type {model_type}")
    return None


@hookspec
def architectures() -> list[str]:
    """The ``architectures`` names (as in config.json) this plugin serves, for listings.

    Called by ``vlmrun plugins``; must not import torch.

    :return: e.g. ``["LlamaForCausalLM", "Qwen2ForCausalLM"]``.
    """


@hookspec
def match(hf_config: Any) -> Claim | bool | None:
    """Does this plugin serve the model described by ``hf_config``?

    The core asks every plugin and collects the claims; the highest priority wins.

    :param hf_config: the model's configuration with attribute access: a
        ``transformers.PretrainedConfig`` when transformers knows the ``model_type``, otherwise a
        :class:`vlm.config.RawConfig` over config.json. For a VLM's language model this is the
        nested text config. Read ``hf_config.architectures`` and ``hf_config.model_type``.
    :return: a :class:`Claim` (or ``True`` for ``Claim()``) to serve it; ``None`` or ``False``
        to decline.

    Example::

        @hookimpl
        def match(hf_config):
            if hf_config.model_type == "qwen2":
                return Claim(priority=0, reason="model_type qwen2")
    """


@hookspec(firstresult=True)
def build_preprocessor(hf_config: Any, model_config: ModelConfig, model_path: str, tokenizer: Any) -> Preprocessor:
    """Build the object that turns prompts / chat messages (with images) into model inputs.

    Called only on the chosen plugin.

    :param hf_config: as in :func:`match`.
    :param model_config: the validated :class:`vlm.config.ModelConfig`.
    :param model_path: the local model directory (tokenizer and processor files live there).
    :param tokenizer: the ``transformers`` tokenizer loaded from ``model_path``.
    :return: a :class:`vlm.inputs.Preprocessor`. Text-only models return
        ``vlm.inputs.TextPreprocessor(tokenizer)``; vision models expand image placeholders to
        the exact count the model consumes and must agree with the transformers processor token
        for token and pixel for pixel.

    Example::

        @hookimpl
        def build_preprocessor(tokenizer):
            from vlm.inputs import TextPreprocessor
            return TextPreprocessor(tokenizer)
    """


@hookspec(firstresult=True)
def build_model(hf_config: Any, model_config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Build the model, with parameters allocated but not loaded.

    Called only on the chosen plugin. The module follows :class:`vlm.plugin.model_protocol.ModelProtocol` (VLMs: :class:`vlm.plugin.model_protocol.VisionModelProtocol`):
    ``forward(input_ids, positions, batch, inputs_embeds=None)`` over a flat batch of tokens
    from many sequences with a KV cache, ``compute_logits(hidden_states)``,
    ``embed_tokens(input_ids)`` and ``load_weights(weights)``. Build it from ``vlm.nn`` layers.

    :param hf_config: as in :func:`match`.
    :param model_config: the validated :class:`vlm.config.ModelConfig`.
    :param dtype: parameter dtype (``torch.float32`` on CPU by default).
    :param device: where to allocate (``meta`` for ``vlmrun check``, which loads nothing).
    :return: a ``torch.nn.Module``.

    Example::

        @hookimpl
        def build_model(hf_config, dtype, device):
            from .model import LlamaForCausalLM
            return LlamaForCausalLM(hf_config, dtype=dtype, device=device)
    """


@hookspec(firstresult=True)
def parse_grounding(
    text: str, image_sizes: list[tuple[int, int]], hf_config: Any, model_inputs: ModelInputs
) -> list[GroundedBox] | None:
    """The boxes a model wrote in an answer, in its own format (contract 1.2, optional).

    Called only on the plugin serving the model (not on the plugin of a VLM's language model),
    once per request that finishes without an error. Each family writes boxes its own way (CogVLM
    ``[[x0,y0,x1,y1]]`` in 0..999, InternVL ``<ref>..</ref><box>[[..]]</box>`` in 0..1000,
    Qwen2-VL ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``), so the plugin that knows its model
    parses them. The result is ``CompletionOutput.boxes`` (the Python API, ``vlmrun
    --draw-boxes``); a family without this hook gives no boxes. ``vlm.plugin.from_normalized`` and
    ``vlm.plugin.from_resized`` turn the usual coordinate conventions into pixels.

    :param text: the generated text, decoded with special tokens kept (box markers are often
        special tokens, which the answer's ``text`` drops).
    :param image_sizes: ``(width, height)`` of the request's original pictures, in prompt order
        (empty for a text-only request), as the plugin's preprocessor recorded them in
        ``ImageInput.extra["image_size"]`` (a plugin implementing this hook records it).
    :param hf_config: as in :func:`match` (e.g. to tell two formats of one family apart).
    :param model_inputs: the request's :class:`vlm.inputs.ModelInputs` as the plugin's
        preprocessor made them; its images' ``extra`` holds what the preprocessor recorded (e.g.
        ``"resized_size"``, for a model that answers in pixels of its resized picture).
    :return: :class:`vlm.grounding.GroundedBox` es in pixels of the original picture
        (``space="pixels"``) that the boxes are about, the request's last picture (the one a
        grounding question is asked about), in the order they appear; ``[]`` when there are none
        (or no picture to place them on), ``None`` when the family has no grounding format.

    Example::

        @hookimpl
        def parse_grounding(text, image_sizes):
            from vlm.plugin import from_normalized

            if not image_sizes:  # a text-only request: nothing to place boxes on
                return []
            # my_boxes(text): [(label, (x1, y1, x2, y2)), ...] as the model wrote them, in 0..1000
            return [from_normalized(label, box, image_sizes[-1]) for label, box in my_boxes(text)]
    """
