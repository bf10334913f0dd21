"""Tiny random LLaVA checkpoints (LLaVA-1.5 with a CLIP or SigLIP tower, LLaVA-NeXT), and
transformers' reference processors.

- :func:`write_tiny_llava` writes a checkpoint made by transformers' ``LlavaForConditionalGeneration``
  or ``LlavaNextForConditionalGeneration`` for one of :data:`VARIANTS`, with a locally built
  byte-level tokenizer that adds ``<s>`` like Llama's, the chat template of the llava-hf repos,
  ``preprocessor_config.json`` and the ``processor_config.json`` that ``LlavaProcessor`` /
  ``LlavaNextProcessor`` read (``patch_size``, ``vision_feature_select_strategy``,
  ``num_additional_image_tokens``).
- ``layout`` picks the tensor names: ``"hub"`` (default) is what the llava-hf repos on the Hub hold
  (``vision_tower.vision_model.*``, ``language_model.model.*``, ``language_model.lm_head.*``,
  ``multi_modal_projector.*``, ``image_newline``); ``"transformers"`` is what transformers 5's
  ``save_pretrained`` writes (``vision_tower.*`` without ``vision_model.``); ``"in-memory"`` is
  transformers 5's module names (``model.vision_tower.*``, ``model.language_model.*``,
  ``lm_head.*``, ``model.image_newline``). All hold the same weights; transformers loads each.
- :func:`load_reference_processor` loads transformers' processor for such a directory (or a real
  one) offline. LLaVA's processors have no video processor, so the stock classes load as they are.

Weights: the text model uses ``initializer_range`` 0.3 (at 0.02 a random model's greedy output is
one repeated token). Every vision, projector and ``image_newline`` tensor is randomised here
(transformers starts norms at 1, biases at 0 and would leave a mix-up of two such tensors in a
weight loader unnoticed); matrices get a fan-in scaled normal so that activations stay O(1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vlm.testing.checkpoints import _text_config

#: The chat template of llava-hf/llava-1.5-*-hf (images first, then text, ``USER:`` / ``ASSISTANT:``).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: The chat template of llava-hf/llava-v1.6-mistral-7b-hf (``[INST] ... [/INST]``).
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<image>"]

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

#: The tiny models: which tower, text model, feature selection and image processor each one has.
VARIANTS: dict[str, dict[str, Any]] = {
    # LLaVA-1.5: CLIP (class token, pre-LN, quick_gelu), second-to-last layer, CLS dropped
    "llava-clip-llama": dict(
        architecture="llava",
        text="llama",
        tower="clip",
        image_size=42,
        layers=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_processor=dict(
            image_processor_type="CLIPImageProcessor",
            size={"shortest_edge": 42},
            crop_size={"height": 42, "width": 42},
            do_resize=True,
            do_center_crop=True,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
            resample=3,
            do_convert_rgb=True,
        ),
        chat_template=LLAVA_CHAT_TEMPLATE,
    ),
    # SigLIP tower (no class token, no pre-LN, an unused head), last layer and embeddings concatenated, all tokens kept
    "llava-siglip-qwen2": dict(
        architecture="llava",
        text="qwen2",
        tower="siglip",
        image_size=42,
        layers=3,
        vision_feature_layer=[-1, 0],
        vision_feature_select_strategy="full",
        multimodal_projector_bias=False,
        image_processor=dict(
            image_processor_type="SiglipImageProcessor",
            size={"height": 42, "width": 42},
            do_resize=True,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
            do_convert_rgb=True,
        ),
        chat_template=LLAVA_CHAT_TEMPLATE,
    ),
    # LLaVA-NeXT: anyres tiles of 28 px on a small set of grids, unpadding, image_newline
    "llava-next-clip-mistral": dict(
        architecture="llava_next",
        text="mistral",
        tower="clip",
        image_size=28,
        layers=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]],
        image_processor=dict(
            image_processor_type="LlavaNextImageProcessor",
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            do_resize=True,
            do_center_crop=True,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
            resample=3,
            do_convert_rgb=True,
            do_pad=True,
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]],
        ),
        chat_template=LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
    ),
}

LAYOUTS = ("hub", "transformers", "in-memory")


def build_llava_tokenizer(chat_template: str = LLAVA_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (256 byte symbols, no merges) that starts every text with ``<s>``
    as Llama's does, with ``</s>``, ``<pad>`` and ``<image>`` (ids 256-259)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def _vision_config(spec: dict[str, Any]):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=spec["layers"],
        num_attention_heads=2,
        image_size=spec["image_size"],
        patch_size=14,
    )
    if spec["tower"] == "siglip":
        return SiglipVisionConfig(**common)  # gelu_pytorch_tanh, with the pooling head llava ignores
    return CLIPVisionConfig(**common, projection_dim=16)  # quick_gelu


def _randomize(model: Any, seed: int) -> None:
    """Random values for every vision, projector and image_newline tensor (see the module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(part in name for part in ("vision_tower.", "multi_modal_projector.", "image_newline")):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if re.search(r"(norm\d?|layrnorm)\.weight$", name):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.dim() >= 2 and "position_embedding" not in name and "probe" not in name:
                param.copy_(noise / param[0].numel() ** 0.5)  # fan-in scaled
            else:  # class_embedding, position_embedding, image_newline, the head's probe
                param.copy_(0.5 * noise)


def write_tiny_llava(
    path: str | Path,
    variant: str = "llava-clip-llama",
    layout: str = "hub",
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random LLaVA checkpoint of one of :data:`VARIANTS` to ``path``.

    :param layout: tensor names, one of :data:`LAYOUTS` (see the module docstring).
    :param tie_word_embeddings: set in the *text* config, as small Qwen2 models do; ``LlavaConfig``
        folds it into its own flag, and no ``lm_head`` is saved.
    :return: ``path``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    spec = VARIANTS[variant]
    path = Path(path)
    tokenizer = build_llava_tokenizer(spec["chat_template"])
    text_config = _text_config(spec["text"], 320, tie_word_embeddings=tie_word_embeddings)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id
    vision_config = _vision_config(spec)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    fields = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        multimodal_projector_bias=spec.get("multimodal_projector_bias", True),
        tie_word_embeddings=False,
    )
    has_cls = spec["tower"] == "clip"
    tokens = (spec["image_size"] // 14) ** 2 + (has_cls and spec["vision_feature_select_strategy"] == "full")
    config: Any
    model_class: Any
    if spec["architecture"] == "llava_next":
        config = LlavaNextConfig(**fields, image_grid_pinpoints=spec["image_grid_pinpoints"], image_seq_length=tokens)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**fields, image_seq_length=tokens)
        model_class = LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _randomize(model, seed)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    if layout != "transformers":
        weights = path / "model.safetensors"
        tensors = load_file(str(weights))
        save_file(
            {rename_saved(name, layout): t.contiguous() for name, t in tensors.items()},
            str(weights),
            metadata={"format": "pt"},
        )

    tokenizer.save_pretrained(path)
    image_processor = dict(spec["image_processor"])
    (path / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    processor = {
        "processor_class": "LlavaNextProcessor" if spec["architecture"] == "llava_next" else "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": 14,
        "vision_feature_select_strategy": spec["vision_feature_select_strategy"],
        "num_additional_image_tokens": int(has_cls),
    }
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(spec["chat_template"])
    return path


def rename_saved(name: str, layout: str) -> str:
    """A tensor name as transformers 5 saves it -> its name in ``layout``."""
    if layout == "transformers":
        return name
    if layout == "hub":
        return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", name)
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    return "model." + name  # vision_tower.*, multi_modal_projector.*, image_newline


def load_reference_processor(path: str | Path):
    """transformers' ``LlavaProcessor`` / ``LlavaNextProcessor`` for a model directory, offline."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


__all__ = [
    "LAYOUTS",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE",
    "VARIANTS",
    "build_llava_tokenizer",
    "load_reference_processor",
    "rename_saved",
    "write_tiny_llava",
]
