"""``vlmrun demo``: the bundled demo model answers questions about the bundled pictures.

No download: the checkpoint (a tiny InternVL trained by scripts/train_demo.py) ships inside the
``vlm.demo`` package. ``--image`` / ``--prompt`` ask your own question instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_ROOT = Path(__file__).resolve().parents[1] / "demo"
DEMO_MODEL = DEMO_ROOT / "internvl-shapes"
DEMO_PICTURES = DEMO_ROOT / "pictures"
QUESTIONS = ("What shape is this?", "What color is the shape?", "How many shapes are there?")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", "-i", help="a picture of your own (default: the bundled pictures)")
    parser.add_argument("--prompt", "-p", help="the question (default: shape, colour and count)")


def demo_command(args: argparse.Namespace) -> int:
    from vlm import LLM, SamplingParams
    from vlm.errors import VlmError
    from vlm.inputs.images import load_image

    if not (DEMO_MODEL / "config.json").is_file():
        raise VlmError(f"the demo model is missing from {DEMO_MODEL}; reinstall vlm-core or run scripts/train_demo.py")
    llm = LLM(str(DEMO_MODEL))
    params = SamplingParams(temperature=0, max_tokens=8)
    pictures = [Path(args.image)] if args.image else sorted(DEMO_PICTURES.glob("*.png"))
    questions = [args.prompt] if args.prompt else list(QUESTIONS)
    conversations, labels = [], []
    for picture in pictures:
        image = load_image(str(picture))
        for question in questions:
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
            conversations.append([{"role": "user", "content": content}])
            labels.append((picture.name, question))
    print(f"demo model: {DEMO_MODEL} ({len(conversations)} questions, batched)", file=sys.stderr)
    for (name, question), output in zip(labels, llm.chat(conversations, params)):
        print(f"{name}: {question} -> {output.outputs[0].text.strip()}")
    return 0
