"""Tiny random checkpoints for the families the transformers fallback is proven on.

Each writer builds the model with transformers' own class (random weights, fixed seed), a
byte-level tokenizer built offline with the family's special tokens, and the family's processor
files, then ``save_pretrained``s them: what a real checkpoint directory holds, in miniature.

- :func:`write_tiny_text` — a text LLM vlm has no plugin for (``phi3``, ``olmo2``);
- :func:`write_tiny_idefics3` — Idefics3 (SmolVLM's architecture): SigLIP-like tower, pixel
  shuffle, image splitting into tiles (``<row_i_col_j>`` tokens);
- :func:`write_tiny_gemma3` — Gemma 3 with a SigLIP tower: bidirectional attention over each
  image's tokens, sliding-window local layers;
- :func:`write_tiny_paligemma` — PaliGemma (Gemma text): a bidirectional prefix, 1-based positions;
- :func:`write_tiny_mllama` — Mllama, whose cross-attention image path the fallback refuses.

Weights use ``initializer_range`` 0.3 in the language model (at 0.02 greedy output is one repeated
token), and the vision towers are randomised here so that images change the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.testing.checkpoints import build_byte_tokenizer, write_tiny_text_model

#: a SmolVLM-style template: iterates content parts, ``<image>`` where each image goes
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

#: Gemma 3's template, reduced: ``<start_of_image>`` where each image goes
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TEXT_FAMILIES = ("phi3", "olmo2")


def write_tiny_text(path: str | Path, model_type: str = "phi3", seed: int = 0, **overrides: Any) -> Path:
    """A tiny random text LLM of a family no first-party plugin serves."""
    # the special tokens are the byte tokenizer's (set by write_tiny_text_model): the family's
    # defaults (Phi-3's 32000) lie outside the tiny vocabulary, and transformers warns about them
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        overrides.setdefault(key, None)
    return write_tiny_text_model(path, model_type=model_type, seed=seed, **overrides)


def _randomize(module: Any, seed: int) -> None:
    """Fan-in scaled normal matrices, small random vectors: every tensor matters."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            else:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))


def _tokenizer(extra: list[str], bos: str | None = None) -> Any:
    from tokenizers import AddedToken

    tokenizer = build_byte_tokenizer(extra)
    if bos is not None:
        tokenizer.add_special_tokens({"bos_token": AddedToken(bos, special=True, normalized=False)})
    return tokenizer


def _text_config_dict(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def _save(model: Any, processor: Any, path: Path, tokenizer: Any) -> Path:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_tiny_idefics3(path: str | Path, seed: int = 0) -> Path:
    """Idefics3: 32-px tiles of 8-px patches, pixel shuffle 2 -> 4 tokens per tile, images split
    into tiles up to 64 px on the longest edge (plus the global view)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *rows])
    vocab = len(tokenizer)
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(model_type="llama", **_text_config_dict(vocab)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _randomize(model.model.vision_model, seed + 1)
    _randomize(model.model.connector, seed + 2)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE)
    return _save(model, processor, path, tokenizer)


def _named_tokenizer(extra: list[str], named: dict[str, str], bos: str | None) -> Any:
    """The byte tokenizer with ``extra`` special tokens, some also named (``tokenizer.boi_token``):
    saved and loaded back once, the way a checkpoint's tokenizer_config.json names them."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        build_byte_tokenizer(extra).save_pretrained(scratch)
        kwargs: dict[str, Any] = {"extra_special_tokens": named}
        if bos is not None:
            kwargs["bos_token"] = bos
        return AutoTokenizer.from_pretrained(scratch, **kwargs)


def write_tiny_gemma3(path: str | Path, seed: int = 0, sliding_window: int = 8) -> Path:
    """Gemma 3: a 32-px SigLIP tower (16 patches pooled to 4 tokens per image), two text layers
    (a sliding-window local layer of ``sliding_window`` tokens, then a global one)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    path = Path(path)
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _named_tokenizer([*named.values(), "<bos>", "<start_of_turn>", "<end_of_turn>"], named, "<bos>")
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    text = _text_config_dict(
        len(tokenizer),
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=sliding_window,
        query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _randomize(model.model.vision_tower, seed + 1)
    _randomize(model.model.multi_modal_projector, seed + 2)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor, tokenizer, image_seq_length=4, chat_template=GEMMA3_CHAT_TEMPLATE)
    return _save(model, processor, path, tokenizer)


def write_tiny_paligemma(path: str | Path, seed: int = 0) -> Path:
    """PaliGemma (Gemma text): a 32-px SigLIP tower, 16 image tokens before ``<bos>`` and the prompt."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    path = Path(path)
    tokenizer = _named_tokenizer(["<image>", "<bos>"], {"image_token": "<image>"}, "<bos>")
    text = _text_config_dict(len(tokenizer), num_key_value_heads=1)
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", **text),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=64,
        ),
        projection_dim=64,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    config.text_config.num_image_tokens = 16  # type: ignore[union-attr]  # a PretrainedConfig by now
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _randomize(model.model.vision_tower, seed + 1)
    _randomize(model.model.multi_modal_projector, seed + 2)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # type: ignore[attr-defined]  # read by PaliGemmaProcessor
    processor = PaliGemmaProcessor(image_processor, tokenizer)
    return _save(model, processor, path, tokenizer)


def write_tiny_mllama(path: str | Path, seed: int = 0) -> Path:
    """Mllama: a text model with one cross-attention layer (images reach it through those layers,
    which the fallback refuses; its text-only prompts skip them)."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    path = Path(path)
    tokenizer = _named_tokenizer(["<|image|>", "<bos>"], {"image_token": "<|image|>"}, "<bos>")
    text = _text_config_dict(len(tokenizer), cross_attention_layers=[1], num_hidden_layers=2, pad_token_id=0)
    text.pop("head_dim")
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=32,
            patch_size=8,
            max_num_tiles=1,
            vision_output_dim=64,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1)
    processor = MllamaProcessor(
        image_processor, tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE.replace("<start_of_image>", "<|image|>")
    )
    return _save(model, processor, path, tokenizer)
