"""Tiny random InternVL checkpoints in both layouts, and transformers' reference processor.

- :func:`write_tiny_internvl` writes a checkpoint made by transformers'
  ``InternVLForConditionalGeneration`` (Hugging Face layout), with a locally built byte-level
  tokenizer that knows InternVL's image tokens, the HF InternVL chat template, and the
  ``preprocessor_config.json`` / ``processor_config.json`` that ``InternVLProcessor`` reads.
  ``layout="original"`` then converts it (:func:`convert_hf_to_original`) to the original
  OpenGVLab layout (``InternVLChatModel``: ``vision_model.*`` with fused ``attn.qkv``, ``mlp1.*``,
  ``language_model.*``; ``llm_config`` / ``vision_config`` of model type ``intern_vit_6b``; the
  image settings in config.json), the one vLLM and lmdeploy load with the model repo's code.
  Both layouts hold the same weights, so a model must give the same outputs from either.
- :func:`load_reference_processor` loads transformers' ``InternVLProcessor`` from such a
  directory (or a real one) without torchvision: the stock class cannot be built without a video
  processor, which needs torchvision, so a subclass passes ``video_processor=None``.

Weights: text and vision linear layers use ``initializer_range`` 0.3 (at transformers' 0.02 a
random model's greedy output is one repeated token). transformers starts biases at 0, norms at 1,
layer scales at a constant and position embeddings at 0; here every vision and projector tensor
is randomised instead, so a mix-up of two such tensors (norm1/norm2, ls1/ls2, q_norm/k_norm) in a
weight loader changes the outputs and fails a parity test.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from vlm.testing.checkpoints import SPECIAL_TOKENS, _text_config

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

#: The chat template of transformers' InternVL checkpoints (``convert_internvl_weights_to_hf.py``).
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

#: The system message of OpenGVLab's ``internvl2_5`` conversation template.
ORIGINAL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

#: ChatML with InternVL's default system message, as in OpenGVLab's tokenizer_config.json: string
#: contents, images written as ``<image>`` in the text. For one user turn it renders exactly
#: the prompt that ``InternVLChatModel.chat`` builds with the ``internvl2_5`` template.
ORIGINAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + ORIGINAL_SYSTEM_MESSAGE + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Image-processor settings of the real InternVL checkpoints (ImageNet mean/std, bicubic).
_IMAGE_PROCESSOR = dict(
    do_resize=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
    do_convert_rgb=True,
    resample=3,
    # the real files say false; InternVLProcessor always passes crop_to_patches=True anyway
    crop_to_patches=False,
)


def build_internvl_tokenizer():
    """A byte-level BPE tokenizer (256 byte symbols, no merges) with ChatML and InternVL tokens.

    The image tokens are named (``tokenizer.context_image_token`` etc.) through
    ``extra_special_tokens``, as ``InternVLProcessor`` requires.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(IMAGE_TOKENS),
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.chat_template = HF_CHAT_TEMPLATE
    return tokenizer


@cache
def _videoless_processor_class():
    from transformers import AutoProcessor, InternVLConfig, InternVLProcessor

    class VideolessInternVLProcessor(InternVLProcessor):
        """InternVLProcessor without its video processor (which needs torchvision)."""

        def __init__(
            self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs
        ):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                image_seq_length=image_seq_length,
                chat_template=chat_template,
                **kwargs,
            )

    # for AutoProcessor.from_pretrained on directories whose processor_config.json names no class
    AutoProcessor.register(InternVLConfig, VideolessInternVLProcessor, exist_ok=True)
    return VideolessInternVLProcessor


def load_reference_processor(path: str | Path):
    """transformers' ``InternVLProcessor`` for a Hugging Face layout directory, offline."""
    return _videoless_processor_class().from_pretrained(str(path))


def _randomize_vision(model: Any, seed: int) -> None:
    """Give every vision-tower and projector tensor random values (see the module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower." not in name and "multi_modal_projector." not in name:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("lambda_1", "lambda_2")):
                param.copy_(0.1 + 0.05 * noise)
            elif "norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("cls_token", "position_embeddings")) or name.endswith(".bias"):
                param.copy_(0.2 * noise)


def write_tiny_internvl(
    path: str | Path, layout: str = "hf", seed: int = 0, image_size: int = 56, **overrides: Any
) -> Path:
    """Write a tiny random InternVL checkpoint (Qwen2 text model) to ``path``.

    :param layout: ``"hf"`` (transformers' ``InternVLForConditionalGeneration``) or
        ``"original"`` (OpenGVLab's ``InternVLChatModel``, same weights).
    :param image_size: tile size in pixels (a multiple of 28: patch 14, downsample 0.5); 448 is
        the real models' value. Tokens per tile = (image_size / 14)^2 / 4.
    :param overrides: ``min_patches`` / ``max_patches`` (tiles per image, default 1 / 6),
        ``use_thumbnail`` (original layout only; transformers always adds a thumbnail),
        ``text_config`` / ``vision_config`` (dicts merged into those configs), anything else is
        an ``InternVLConfig`` field (e.g. ``downsample_ratio``).
    :return: ``path``.
    """
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', not {layout!r}")
    path = Path(path)
    if layout == "original":
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = write_tiny_internvl(Path(tmp) / "hf", "hf", seed, image_size, **overrides)
            return convert_hf_to_original(hf_dir, path, use_thumbnail=overrides.get("use_thumbnail", True))

    import torch
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
    )

    min_patches = overrides.pop("min_patches", 1)
    max_patches = overrides.pop("max_patches", 6)
    overrides.pop("use_thumbnail", None)
    tokenizer = build_internvl_tokenizer()
    text_config = _text_config("qwen2", overrides.pop("vocab_size", 320), **overrides.pop("text_config", {}))
    text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_config.bos_token_id = None
    vision_config = InternVLVisionConfig(
        **{
            **dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                patch_size=14,
                image_size=[image_size, image_size],
                use_qk_norm=True,
                attention_bias=True,
                layer_scale_init_value=0.1,
                initializer_range=0.3,
                norm_type="layer_norm",
            ),
            **overrides.pop("vision_config", {}),
        }
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.context_image_token_id,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
        **overrides,
    )
    patch = vision_config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    tokens_per_tile = int((image_size // patch) ** 2 * config.downsample_ratio**2)
    config.image_seq_length = tokens_per_tile

    torch.manual_seed(seed)
    model: Any = InternVLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    _randomize_vision(model, seed)
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        min_patches=min_patches,
        max_patches=max_patches,
        **_IMAGE_PROCESSOR,
    )
    image_processor.save_pretrained(path)
    # real checkpoints also name "processor_class": "InternVLProcessor"; leaving it out lets
    # AutoProcessor pick the registered video-less subclass
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": tokens_per_tile}, indent=2) + "\n")
    return path


# HF (as saved: vision_tower.*, multi_modal_projector.*, language_model.{model,lm_head}.*) ->
# original names; the inverse of transformers' convert_internvl_weights_to_hf.py
_VISION_RENAMES = [
    (r"^vision_tower\.", "vision_model."),
    (r"\.embeddings\.cls_token$", ".embeddings.class_embedding"),
    (r"\.embeddings\.position_embeddings$", ".embeddings.position_embedding"),
    (r"\.embeddings\.patch_embeddings\.projection\.", ".embeddings.patch_embedding."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]
_PROJECTOR_RENAMES = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def hf_name_to_original(name: str) -> str:
    """One Hugging Face tensor name -> its original OpenGVLab name (q/k/v are fused separately)."""
    name = name.removeprefix("model.")  # transformers' in-memory names
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("language_model."):
        rest = name.removeprefix("language_model.")
        return name if rest.startswith(("model.", "lm_head.")) else "language_model.model." + rest
    if name.startswith("multi_modal_projector."):
        module, _, leaf = name.removeprefix("multi_modal_projector.").partition(".")
        return f"mlp1.{_PROJECTOR_RENAMES[module]}.{leaf}"
    if name.startswith("vision_tower."):
        for pattern, replacement in _VISION_RENAMES:
            name = re.sub(pattern, replacement, name)
        return name
    raise ValueError(f"unexpected InternVL tensor {name!r}")


def convert_hf_to_original(hf_dir: str | Path, out_dir: str | Path, use_thumbnail: bool = True) -> Path:
    """Rewrite a Hugging Face layout InternVL checkpoint (one safetensors file) in the original layout.

    Writes config.json (``InternVLChatModel``), model.safetensors with the original tensor names
    (q, k and v concatenated into ``attn.qkv``), and the tokenizer with the original chat
    template and without the named image tokens (original tokenizers only list them as added
    special tokens). Image settings come from preprocessor_config.json.
    """
    import torch
    from safetensors.torch import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    image_processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))

    converted = {}
    for name, tensor in tensors.items():
        if re.search(r"\.attention\.[kv]_proj\.", name):
            continue
        if ".attention.q_proj." in name:
            parts = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            converted[hf_name_to_original(name.replace("q_proj", "qkv"))] = torch.cat(parts).contiguous()
        else:
            converted[hf_name_to_original(name)] = tensor.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    vision, text = config["vision_config"], config["text_config"]
    image_size = int(image_processor["size"]["height"])
    original = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": config.get("downsample_ratio", 0.5),
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": image_processor.get("max_patches", 12),
        "min_dynamic_patch": image_processor.get("min_patches", 1),
        "use_thumbnail": use_thumbnail,
        "ps_version": "v2",
        "select_layer": config.get("vision_feature_layer", -1),
        "template": "internvl2_5",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "torch_dtype": config.get("dtype") or config.get("torch_dtype") or "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            "num_attention_heads": vision["num_attention_heads"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_channels": vision.get("num_channels", 3),
            "qkv_bias": vision.get("attention_bias", False),
            "qk_normalization": vision.get("use_qk_norm", False),
            "norm_type": vision.get("norm_type", "layer_norm"),
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
            "hidden_act": vision.get("hidden_act", "gelu"),
            "image_size": int(vision["image_size"][0]),
            "patch_size": int(vision["patch_size"][0]),
            "initializer_factor": 1.0,
            "initializer_range": vision.get("initializer_range", 0.02),
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "use_flash_attn": False,
        },
        "llm_config": {**text, "architectures": ["Qwen2ForCausalLM"]},
    }
    (out_dir / "config.json").write_text(json.dumps(original, indent=2, ensure_ascii=False) + "\n")
    if (hf_dir / "generation_config.json").is_file():
        shutil.copy(hf_dir / "generation_config.json", out_dir / "generation_config.json")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer.chat_template = ORIGINAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    tokenizer_config_file = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    for key in [*IMAGE_TOKENS, "model_specific_special_tokens", "is_local", "local_files_only"]:
        tokenizer_config.pop(key, None)
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


__all__ = [
    "HF_CHAT_TEMPLATE",
    "IMAGE_TOKENS",
    "ORIGINAL_CHAT_TEMPLATE",
    "ORIGINAL_SYSTEM_MESSAGE",
    "build_internvl_tokenizer",
    "convert_hf_to_original",
    "hf_name_to_original",
    "load_reference_processor",
    "write_tiny_internvl",
]
