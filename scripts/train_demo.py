#!/usr/bin/env python
"""Train the bundled demo model: a tiny InternVL that answers questions about pictures of shapes.

    python scripts/train_demo.py --seed 0 --out core/demo/internvl-shapes

The model is transformers' ``InternVLForConditionalGeneration`` (InternViT vision tower, pixel
shuffle, MLP projector, Qwen2 text model), tiny and trained from scratch on pictures and questions
from :mod:`vlm.demo.shapes`. Training inputs are made by transformers' own ``InternVLProcessor``
(loaded back from the output directory) on the same chat messages inference uses, so the model sees
exactly the token sequence that ``vlm`` and transformers build at inference:
``<|im_start|>user\\n<img><IMG_CONTEXT>*16</img>\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\n``,
followed by the answer and ``<|im_end|>`` (the loss covers only those).

Two stages, both plain PyTorch AdamW in fp32 on freshly generated batches:

1. vision pretraining: the vision tower and projector with linear probe heads on the image tokens
   (kind, colour, count, which quadrants hold a shape), thrown away afterwards -- one question per
   picture is too weak a signal to teach a vision tower from scratch in minutes;
2. the whole model on question/answer sequences (the pretrained parts at a lower rate).

Seeded: the same seed and thread count give a byte-identical checkpoint. It prints held-out accuracy (greedy ``generate`` on pictures of another seed) as it goes and at the
end, and writes the sample pictures (``--pictures``) with their answers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from vlm.demo import shapes

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# what InternVL's real checkpoints use (ImageNet mean/std, bicubic); one tile per image
IMAGE_PROCESSOR = dict(
    do_resize=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
    do_convert_rgb=True,
    resample=3,
    crop_to_patches=False,
    min_patches=1,
    max_patches=1,
)
EVAL_SEED_OFFSET = 1_000_000  # held-out pictures: seed + this (the tests use yet another seed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="core/demo/internvl-shapes")
    p.add_argument("--pictures", default="core/demo/pictures", help="where to write the sample pictures ('' = don't)")
    p.add_argument(
        "--pretrain-steps", type=int, default=1500, help="stage 1: vision tower + projector with probe heads"
    )
    p.add_argument("--steps", type=int, default=1000, help="stage 2: the whole model on question/answer sequences")
    p.add_argument("--vision-lr-scale", type=float, default=0.3, help="stage 2 learning rate of the pretrained parts")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--vision-hidden", type=int, default=96)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# checkpoint skeleton: tokenizer, processor files, config


def build_tokenizer():
    """Byte-level BPE (256 byte symbols, no merges), ChatML tokens, InternVL's named image tokens."""
    from vlm.testing.checkpoints import build_byte_tokenizer

    return build_byte_tokenizer(extra_special_tokens=list(IMAGE_TOKENS.values()))


def chat_template() -> str:
    from vlm_plugin_internvl.testing import HF_CHAT_TEMPLATE  # transformers' InternVL chat template

    return HF_CHAT_TEMPLATE


def write_skeleton(out: Path, args: argparse.Namespace):
    """Tokenizer + processor files in ``out``; return (tokenizer, InternVLConfig)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLConfig, InternVLVisionConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(out)
    # reload with the image tokens named (InternVLProcessor reads tokenizer.context_image_token etc.)
    tokenizer = AutoTokenizer.from_pretrained(out, extra_special_tokens=dict(IMAGE_TOKENS))
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(out)
    _drop_keys(out / "tokenizer_config.json", ("is_local", "local_files_only"))  # from_pretrained's own kwargs

    size = shapes.IMAGE_SIZE
    patch = 14
    downsample = 0.5
    tokens_per_tile = int((size // patch) ** 2 * downsample**2)
    GotOcr2ImageProcessorPil(size={"height": size, "width": size}, **IMAGE_PROCESSOR).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": tokens_per_tile}, indent=2) + "\n")

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.text_hidden,
        intermediate_size=args.text_hidden * 3,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_hidden // 32,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    vision_config = InternVLVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_hidden // 32,
        image_size=[size, size],
        patch_size=[patch, patch],
        use_qk_norm=False,
        attention_bias=True,
        layer_scale_init_value=0.1,
        norm_type="layer_norm",
        use_mean_pooling=False,
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=downsample,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    return tokenizer, config


def _drop_keys(path: Path, keys) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in keys}, indent=2, ensure_ascii=False) + "\n")


def load_processor(out: Path):
    from vlm_plugin_internvl.testing import load_reference_processor

    return load_reference_processor(out)


# ---------------------------------------------------------------------------------------------
# data


def conversation(question: str, image=None) -> list[dict]:
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


class Batcher:
    """Training / eval inputs made by transformers' InternVLProcessor from chat messages."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self._prompts: dict[str, str] = {}

    def prompt_text(self, question: str) -> str:
        if question not in self._prompts:
            self._prompts[question] = self.processor.apply_chat_template(
                conversation(question), add_generation_prompt=True, tokenize=False
            )
        return self._prompts[question]

    def prompts(self, images, questions) -> dict:
        """Processor output for pictures + questions (left-padded if the questions differ in length)."""
        return self.processor(
            text=[self.prompt_text(q) for q in questions], images=list(images), return_tensors="pt", padding=True
        )

    def training_batch(self, examples) -> dict:
        """Right-padded prompt + answer + <|im_end|>; labels only on answer and <|im_end|>."""
        images, questions, answers = zip(*examples)
        enc = self.prompts(images, questions)
        rows, labels = [], []
        for ids, mask, answer in zip(enc["input_ids"], enc["attention_mask"], answers):
            prompt = ids[mask.bool()].tolist()  # strip the processor's left padding
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        label_t = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(row)] = torch.tensor(row)
            label_t[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"], "labels": label_t}


@torch.no_grad()
def greedy_answers(model, batcher: Batcher, images, questions, max_new_tokens: int = 8) -> list[str]:
    """transformers' greedy ``generate``, batched by question (same length: no padding)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[q].append(i)
    answers: list[str] = [""] * len(questions)
    for q, idx in groups.items():
        enc = batcher.prompts([images[i] for i in idx], [q] * len(idx))
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        texts = batcher.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            answers[i] = text.strip()
    return answers


def evaluate(model, batcher: Batcher, examples) -> tuple[float, list[tuple[str, str, str]]]:
    was_training = model.training
    model.eval()
    images, questions, expected = zip(*examples)
    got = greedy_answers(model, batcher, list(images), list(questions))
    model.train(was_training)
    wrong = [(q, e, g) for q, e, g in zip(questions, expected, got) if not shapes.answer_is_correct(q, e, g)]
    return 1 - len(wrong) / len(examples), wrong


# ---------------------------------------------------------------------------------------------
# stage 1: pretrain the vision tower (as InternViT is pretrained before the VLM is put together)

COLOR_CLASSES = list(shapes.COLORS) + [shapes.MIXED]


class ProbeHeads(torch.nn.Module):
    """Linear probes on the projector's image tokens; thrown away after stage 1.

    Global (mean over the 16 tokens): kind, colour (or mixed), count. Per quadrant (mean of its
    2x2 tokens; the pixel shuffle keeps tokens in row-major order): is a shape there?
    """

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.globals = torch.nn.Linear(width, len(shapes.KINDS) + len(COLOR_CLASSES) + shapes.MAX_SHAPES)
        self.quadrant = torch.nn.Linear(width, 1)

    def loss(self, features: torch.Tensor, scenes) -> tuple[torch.Tensor, dict]:
        b, g = features.shape[0], self.grid
        logits = self.globals(features.mean(1))
        k, c = len(shapes.KINDS), len(COLOR_CLASSES)
        kind = torch.tensor([shapes.KINDS.index(s.kind) for s in scenes])
        color = torch.tensor([COLOR_CLASSES.index(s.uniform_color or shapes.MIXED) for s in scenes])
        count = torch.tensor([s.count - 1 for s in scenes])
        quads = features.reshape(b, 2, g // 2, 2, g // 2, -1).mean((2, 4)).reshape(b, 4, -1)
        occupied = torch.zeros(b, 4)
        for i, scene in enumerate(scenes):
            for sh in scene.shapes:
                occupied[i, int(sh.cy * 2 // shapes.IMAGE_SIZE) * 2 + int(sh.cx * 2 // shapes.IMAGE_SIZE)] = 1
        f = torch.nn.functional
        q_logits = self.quadrant(quads).squeeze(-1)
        loss = (
            f.cross_entropy(logits[:, :k], kind)
            + f.cross_entropy(logits[:, k : k + c], color)
            + f.cross_entropy(logits[:, k + c :], count)
            + 2 * f.binary_cross_entropy_with_logits(q_logits, occupied)
        )
        acc = {
            "kind": (logits[:, :k].argmax(1) == kind).float().mean().item(),
            "color": (logits[:, k : k + c].argmax(1) == color).float().mean().item(),
            "count": ((q_logits > 0).sum(1) == count + 1).float().mean().item(),
        }
        return loss, acc


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output for each picture: what the text model sees, (pictures, tokens, hidden)."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def pretrain_vision(model, processor, args, lr_at) -> None:
    from tqdm import tqdm

    config = model.config
    grid = int(config.image_seq_length**0.5)
    heads = ProbeHeads(config.text_config.hidden_size, grid)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(
        params + list(heads.parameters()), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay
    )
    rng = random.Random(args.seed + 1)
    eval_rng = random.Random(args.seed + EVAL_SEED_OFFSET + 1)
    eval_pictures = [shapes.make_picture(eval_rng) for _ in range(200)]
    eval_pixels = processor.image_processor([p[0] for p in eval_pictures], return_tensors="pt")["pixel_values"]
    bar = tqdm(range(args.pretrain_steps), desc="stage 1 (vision)", unit="step", file=sys.stdout, mininterval=5)
    for step in bar:
        pictures = [shapes.make_picture(rng) for _ in range(args.batch_size)]
        pixels = processor.image_processor([p[0] for p in pictures], return_tensors="pt")["pixel_values"]
        loss, _ = heads.loss(image_features(model, pixels), [p[1] for p in pictures])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.pretrain_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.pretrain_steps:
            with torch.no_grad():
                _, acc = heads.loss(image_features(model, eval_pixels), [p[1] for p in eval_pictures])
            bar.write(
                f"stage 1 step {step + 1}: probe accuracy on held-out pictures "
                + ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
            )
    bar.close()


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    _, config = write_skeleton(out, args)
    processor = load_processor(out)
    batcher = Batcher(processor)

    model = InternVLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=batcher.eos,
        pad_token_id=batcher.pad,
        bos_token_id=None,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.image_seq_length} image tokens per picture", flush=True)

    def lr_at(step: int, total: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.time()
    model.train()
    if args.pretrain_steps:
        pretrain_vision(model, processor, args, lr_at)
    pretrained = {id(p) for p in model.model.vision_tower.parameters()} | {
        id(p) for p in model.model.multi_modal_projector.parameters()
    }

    groups = defaultdict(list)  # (pretrained?, decays?) -> parameters
    for name, param in model.named_parameters():
        groups[(id(param) in pretrained and args.pretrain_steps > 0, param.ndim >= 2 and "embed" not in name)].append(
            param
        )
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": args.weight_decay if decays else 0.0,
                "lr_scale": args.vision_lr_scale if was_pretrained else 1.0,
            }
            for (was_pretrained, decays), params in groups.items()
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    rng = random.Random(args.seed)
    eval_examples = shapes.make_examples(args.seed + EVAL_SEED_OFFSET, args.eval_size)
    bar = tqdm(range(args.steps), desc="stage 2 (VLM)", unit="step", file=sys.stdout, mininterval=5)
    smoothed = None
    for step in bar:
        batch = batcher.training_batch([shapes.make_example(rng) for _ in range(args.batch_size)])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps) * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr_at(step, args.steps):.1e}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc, wrong = evaluate(model, batcher, eval_examples)
            bar.write(
                f"step {step + 1}: loss {smoothed:.4f}, held-out accuracy {acc:.1%} "
                f"({time.time() - start:.0f}s) e.g. wrong: {wrong[:3]}"
            )
    bar.close()
    train_seconds = time.time() - start
    model.eval()
    model.save_pretrained(out)  # safetensors, fp32
    print(
        f"trained {args.pretrain_steps} + {args.steps} steps x {args.batch_size} in {train_seconds:.0f}s; saved to {out}",
        flush=True,
    )

    # reload exactly what was saved, and grade it on pictures it never saw
    model = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = load_processor(out)
    batcher = Batcher(processor)
    acc, wrong = evaluate(model, batcher, eval_examples)
    print(
        f"held-out accuracy (transformers greedy, {args.eval_size} pictures, seed {args.seed + EVAL_SEED_OFFSET}): "
        f"{acc:.1%}; wrong: {wrong}",
        flush=True,
    )

    if args.pictures:
        pictures = Path(args.pictures)
        pictures.mkdir(parents=True, exist_ok=True)
        samples = shapes.sample_pictures()
        for name, (image, scene) in samples.items():
            image.save(pictures / name)
            qa = shapes.questions_for(scene)
            got = greedy_answers(model, batcher, [image] * len(qa), [q for q, _ in qa])
            line = "; ".join(
                f"{q} -> {g}" + ("" if shapes.answer_is_correct(q, a, g) else f" (expected {a})")
                for (q, a), g in zip(qa, got)
            )
            print(f"{name}: {line}")
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    print(f"model.safetensors: {size_mb:.1f} MB; training time {train_seconds / 60:.1f} min", flush=True)
    return 0 if acc >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
