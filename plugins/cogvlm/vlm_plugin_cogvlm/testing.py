"""Tiny CogVLM checkpoints for tests: random weights under the real tensor names, tokenizers built
offline with the real special tokens.

- :func:`write_tiny_cogvlm` writes the Hub layout (config.json, model.safetensors, tokenizer,
  generation_config.json) of CogVLM2 (``"cogvlm2"``: Llama 3 tokenizer, grouped-query attention,
  2x2 conv down-sampling) or CogVLM 1 (``"cogvlm"``: Vicuna tokenizer).
- :func:`convert_hub_to_sat` writes the same weights in CogVLM 1's original SAT layout
  (model_config.json, ``latest``, ``1/mp_rank_00_model_states.pt``).

Weights are drawn at std 0.3 (norms around 1): at transformers' 0.02 a random model repeats one
token and parity proves little.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VARIANTS = ("cogvlm2", "cogvlm")

#: Llama 3's special tokens in their order from id 128000 (here from 256, after the 256 byte symbols)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]


def build_llama3_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens; BOS is added as Llama 3's
    post-processor adds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for token in LLAMA3_SPECIALS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    bos = LLAMA3_SPECIALS[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS[2:]})
    return tokenizer


def build_vicuna_tokenizer():
    """A Llama / Vicuna (SentencePiece-style, byte fallback) tokenizer: ``<unk>`` 0 (also the pad,
    as Vicuna's), ``<s>`` 1, ``</s>`` 2."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<unk>")


def tiny_config(variant: str, tokenizer: Any) -> dict[str, Any]:
    """config.json of a tiny checkpoint in the Hub layout."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5)
    vision = dict(
        dropout_prob=0.0, hidden_act="gelu", in_channels=3, num_hidden_layers=2, hidden_size=32, num_heads=2,
        intermediate_size=64, layer_norm_eps=1e-6, patch_size=14,
    )  # fmt: skip
    if variant == "cogvlm2":
        image_size, vocab_size = 112, 272
        text.update(num_multi_query_heads=2, max_position_embeddings=512)
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")],
            pad_token_id=tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>"),
        )
    elif variant == "cogvlm":
        image_size, vocab_size = 56, 264
        text.update(max_position_embeddings=512)
        ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    vision.update(image_size=image_size, num_positions=(image_size // 14) ** 2 + 1)
    return {
        "architectures": ["CogVLMForCausalLM"],
        "hidden_act": "silu",
        "template_version": "chat",
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
        **text,
        **ids,
        "vision_config": vision,
    }


def hub_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hub layout, by name, with its shape."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_multi_query_heads", heads)
    qkv = hidden + 2 * kv_heads * (hidden // heads)
    v = config["vision_config"]
    vh, vi, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.language_expert_query_key_value.weight": (qkv, hidden),
                p + "self_attn.vision_expert_query_key_value.weight": (qkv, hidden),
                p + "self_attn.vision_expert_query_key_value.bias": (qkv,),
                p + "self_attn.language_expert_dense.weight": (hidden, hidden),
                p + "self_attn.vision_expert_dense.weight": (hidden, hidden),
            }
        )
        for expert in ("language_mlp", "vision_mlp"):
            shapes[p + f"mlp.{expert}.gate_proj.weight"] = (inter, hidden)
            shapes[p + f"mlp.{expert}.up_proj.weight"] = (inter, hidden)
            shapes[p + f"mlp.{expert}.down_proj.weight"] = (hidden, inter)
    e = "model.vision."
    shapes.update(
        {
            e + "patch_embedding.proj.weight": (vh, v["in_channels"], patch, patch),
            e + "patch_embedding.proj.bias": (vh,),
            e + "patch_embedding.cls_embedding": (1, vh),
            e + "patch_embedding.position_embedding.weight": (v["num_positions"], vh),
        }
    )
    for i in range(v["num_hidden_layers"]):
        p = f"{e}transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + f"{norm}.weight"] = shapes[p + f"{norm}.bias"] = (vh,)
        shapes.update(
            {
                p + "attention.query_key_value.weight": (3 * vh, vh),
                p + "attention.query_key_value.bias": (3 * vh,),
                p + "attention.dense.weight": (vh, vh),
                p + "attention.dense.bias": (vh,),
                p + "mlp.fc1.weight": (vi, vh),
                p + "mlp.fc1.bias": (vi,),
                p + "mlp.fc2.weight": (vh, vi),
                p + "mlp.fc2.bias": (vh,),
            }
        )
    cogvlm2 = "num_multi_query_heads" in config
    if cogvlm2:
        shapes[e + "conv.weight"] = (hidden, vh, 2, 2)
        shapes[e + "conv.bias"] = (hidden,)
    shapes.update(
        {
            e + "linear_proj.linear_proj.weight": (hidden, hidden if cogvlm2 else vh),
            e + "linear_proj.norm1.weight": (hidden,),
            e + "linear_proj.norm1.bias": (hidden,),
            e + "linear_proj.gate_proj.weight": (inter, hidden),
            e + "linear_proj.dense_h_to_4h.weight": (inter, hidden),
            e + "linear_proj.dense_4h_to_h.weight": (hidden, inter),
            e + "boi": (1, 1, hidden),
            e + "eoi": (1, 1, hidden),
            "lm_head.weight": (vocab, hidden),
        }
    )
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    """Norm weights around 1 and their biases around 0; everything else normal with std 0.3
    (token embeddings and boi / eoi std 1, as embeddings are)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in name:
            tensors[name] = (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
        elif name.endswith(("embed_tokens.weight", "boi", "eoi")):
            tensors[name] = noise
        else:
            tensors[name] = 0.3 * noise
    return tensors


def write_tiny_cogvlm(path: str | Path, variant: str = "cogvlm2", seed: int = 0, **overrides: Any) -> Path:
    """A tiny random CogVLM in the Hub layout at ``path``; ``overrides`` replace config fields
    (``vision_config`` is merged: e.g. ``vision_config={"image_size": 224}``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama3_tokenizer() if variant == "cogvlm2" else build_vicuna_tokenizer()
    config = tiny_config(variant, tokenizer)
    vision = {**config["vision_config"], **overrides.pop("vision_config", {})}
    vision["num_positions"] = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    config.update(overrides, vision_config=vision)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(random_tensors(hub_tensor_shapes(config), seed), str(path / "model.safetensors"))
    tokenizer.save_pretrained(path)
    return path


def _hub_to_sat_names(config: dict[str, Any]) -> dict[str, str]:
    """Hub name -> SAT name for every tensor (the inverse of ``model.sat_to_hub_name``, written out)."""
    names = {
        "model.embed_tokens.weight": "transformer.word_embeddings.weight",
        "model.norm.weight": "transformer.final_layernorm.weight",
        "lm_head.weight": "mixins.lm.lm_head.weight",
        "model.vision.patch_embedding.cls_embedding": "mixins.eva.vit_model.transformer.word_embeddings.weight",
        "model.vision.patch_embedding.position_embedding.weight": "mixins.eva.vit_model.transformer.position_embeddings.weight",
        "model.vision.boi": "mixins.eva.boi",
        "model.vision.eoi": "mixins.eva.eoi",
    }
    for kind in ("weight", "bias"):
        names[f"model.vision.patch_embedding.proj.{kind}"] = f"mixins.eva.vit_model.mixins.patch_embedding.proj.{kind}"
    for i in range(config["num_hidden_layers"]):
        hub, sat = f"model.layers.{i}.", f"transformer.layers.{i}."
        names.update(
            {
                hub + "input_layernorm.weight": sat + "input_layernorm.weight",
                hub + "post_attention_layernorm.weight": sat + "post_attention_layernorm.weight",
                hub + "self_attn.language_expert_query_key_value.weight": sat + "attention.query_key_value.weight",
                hub + "self_attn.language_expert_dense.weight": sat + "attention.dense.weight",
                hub
                + "self_attn.vision_expert_query_key_value.weight": f"mixins.rotary.vision_query_key_value_list.{i}.weight",
                hub
                + "self_attn.vision_expert_query_key_value.bias": f"mixins.rotary.vision_query_key_value_list.{i}.bias",
                hub + "self_attn.vision_expert_dense.weight": f"mixins.rotary.vision_dense_list.{i}.weight",
                hub + "mlp.language_mlp.gate_proj.weight": f"mixins.mlp.gate_proj.{i}.weight",
                hub + "mlp.language_mlp.up_proj.weight": sat + "mlp.dense_h_to_4h.weight",
                hub + "mlp.language_mlp.down_proj.weight": sat + "mlp.dense_4h_to_h.weight",
                hub + "mlp.vision_mlp.gate_proj.weight": f"mixins.mlp.vision_gate_proj.{i}.weight",
                hub + "mlp.vision_mlp.up_proj.weight": f"mixins.mlp.vision_dense_h_to_4h_list.{i}.weight",
                hub + "mlp.vision_mlp.down_proj.weight": f"mixins.mlp.vision_dense_4h_to_h_list.{i}.weight",
            }
        )
    vision = config["vision_config"]
    for i in range(vision["num_hidden_layers"]):
        hub, sat = f"model.vision.transformer.layers.{i}.", f"mixins.eva.vit_model.transformer.layers.{i}."
        for kind in ("weight", "bias"):
            for part in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense"):
                names[f"{hub}{part}.{kind}"] = f"{sat}{part}.{kind}"
            names[f"{hub}mlp.fc1.{kind}"] = f"{sat}mlp.dense_h_to_4h.{kind}"
            names[f"{hub}mlp.fc2.{kind}"] = f"{sat}mlp.dense_4h_to_h.{kind}"
    for part in (
        "linear_proj.weight",
        "norm1.weight",
        "norm1.bias",
        "gate_proj.weight",
        "dense_h_to_4h.weight",
        "dense_4h_to_h.weight",
    ):
        names[f"model.vision.linear_proj.{part}"] = f"mixins.eva.linear_proj.{part}"
    return names


def convert_hub_to_sat(hub_dir: str | Path, out_dir: str | Path) -> Path:
    """The Hub-layout CogVLM 1 in ``hub_dir`` as SAT writes it (same weights, same tokenizer files)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    hub_dir, out_dir = Path(hub_dir), Path(out_dir)
    config = json.loads((hub_dir / "config.json").read_text())
    if "num_multi_query_heads" in config:
        raise ValueError("the SAT layout is written for CogVLM 1 only")
    vision = config["vision_config"]
    sat_config = {
        "model_class": "CogVLMModel",
        "tokenizer_type": "lmsys/vicuna-7b-v1.5",
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "layernorm_order": "pre",
        "model_parallel_size": 1,
        "max_sequence_length": config["max_position_embeddings"],
        "use_bias": False,
        "inner_hidden_size": config["intermediate_size"],
        "layernorm_epsilon": config["rms_norm_eps"],
        "image_length": (vision["image_size"] // vision["patch_size"]) ** 2,
        "eva_args": {
            "model_class": "EVA2CLIPModel",
            "num_layers": vision["num_hidden_layers"],
            "hidden_size": vision["hidden_size"],
            "num_attention_heads": vision["num_heads"],
            "vocab_size": 1,
            "layernorm_order": "post",
            "model_parallel_size": 1,
            "max_sequence_length": vision["num_positions"],
            "inner_hidden_size": vision["intermediate_size"],
            "use_final_layernorm": False,
            "layernorm_epsilon": vision["layer_norm_eps"],
            "image_size": [vision["image_size"], vision["image_size"]],
            "pre_len": 1,
            "post_len": 0,
            "in_channels": vision["in_channels"],
            "patch_size": vision["patch_size"],
        },
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "torch_dtype": config["torch_dtype"],  # not a SAT field: keeps the tiny model in float32
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_config.json").write_text(json.dumps(sat_config, indent=2))
    names = _hub_to_sat_names(config)
    state = {names[name]: tensor for name, tensor in load_file(str(hub_dir / "model.safetensors")).items()}
    (out_dir / "latest").write_text("1")
    (out_dir / "1").mkdir(exist_ok=True)
    torch.save({"module": state, "iteration": 1}, out_dir / "1" / "mp_rank_00_model_states.pt")
    AutoTokenizer.from_pretrained(str(hub_dir)).save_pretrained(out_dir)
    return out_dir


class OriginalProcessor:
    """CogVLM's own preprocessing, as ``build_conversation_input_ids`` and torchvision do it,
    written apart from the plugin's preprocessor (the conformance kit's ``reference_processor``):

    - chat messages render as ``_history_to_prompt`` (``Question: ... Answer:`` for ``chat``);
    - ids: BOS, the image placeholder ``vision_token_num`` times, the text without special tokens;
    - pixels: ``Resize((S, S), BICUBIC)`` (on a PIL image torchvision calls PIL's resize),
      ``ToTensor`` (``uint8 -> float32 / 255``), ``Normalize`` (``sub_(mean).div_(std)``), in torch.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            vision = config["vision_config"]
            self.image_size, self.patch_size = vision["image_size"], vision["patch_size"]
            self.cogvlm2 = "num_multi_query_heads" in config
            self.template = config.get("template_version", "chat")
        else:  # SAT: CogVLM 1
            eva = json.loads((path / "model_config.json").read_text())["eva_args"]
            self.image_size, self.patch_size, self.cogvlm2, self.template = (
                eva["image_size"][0],
                eva["patch_size"],
                False,
                "chat",
            )
        side = self.image_size // self.patch_size // (2 if self.cogvlm2 else 1)
        self.vision_token_num = side * side + 2
        self.pad_id = (
            self.tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
            if self.cogvlm2
            else self.tokenizer.pad_token_id
        )

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        def text(message):
            content = message["content"]
            return (
                content
                if isinstance(content, str)
                else "".join(p.get("text", "") for p in content if p["type"] == "text")
            )

        users = [text(m) for m in messages if m["role"] == "user"]
        answers = [text(m) for m in messages if m["role"] == "assistant"]
        if self.template == "base":
            return users[-1]
        answer_format = "Short answer:" if self.template == "vqa" else "Answer:"
        prompt = ""
        for old_query, response in zip(users[:-1], answers):
            prompt += "Question: " + old_query + f" {answer_format} " + response + "\n"
        return prompt + f"Question: {users[-1]} {answer_format}"

    def pixels(self, image):
        import numpy as np
        import torch
        from PIL import Image

        resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        tensor = torch.from_numpy(np.array(resized, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = tensor.to(dtype=torch.float32).div(255)
        mean = torch.as_tensor(self.MEAN, dtype=torch.float32)[:, None, None]
        std = torch.as_tensor(self.STD, dtype=torch.float32)[:, None, None]
        return tensor.sub_(mean).div_(std)

    def __call__(self, text, images=None, return_tensors="pt", add_special_tokens=True):
        import torch

        ids = [self.tokenizer.bos_token_id]
        outputs = {}
        if images:
            assert len(images) == 1, "CogVLM takes one picture"
            ids += [self.pad_id] * self.vision_token_num
            outputs["pixel_values"] = self.pixels(images[0])[None]
        ids += self.tokenizer.encode(text, add_special_tokens=False)
        outputs["input_ids"] = torch.tensor([ids])
        return outputs


def tiny_original_processor(path: str | Path) -> OriginalProcessor:
    return OriginalProcessor(path)
