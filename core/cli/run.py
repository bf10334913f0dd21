"""``vlmrun --model DIR``: one-shot generation with ``--prompt``, otherwise an interactive chat.

Generated text goes to stdout and nothing else does; logs and the chat prompt go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlm.cli.engine_args import add_engine_arguments, engine_settings

CHAT_HELP = "commands: /image PATH attaches a picture to your next message, /clear starts over, /exit (or Ctrl-D) quits"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", "-p", help="generate once for this prompt and exit; '-' reads stdin")
    parser.add_argument(
        "--image",
        "-i",
        action="append",
        default=[],
        metavar="PATH",
        help="picture for the prompt (repeatable; with chat: attached to the first message)",
    )
    parser.add_argument("--system", help="system message for chat templates")
    parser.add_argument("--no-chat-template", action="store_true", help="send --prompt as raw text")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per answer instead of the text: text, token_ids, finish_reason, "
        "usage, timings (ttft_s, total_s, tokens_per_s) and the model path",
    )
    parser.add_argument(
        "--draw-boxes",
        metavar="OUT.png",
        help="with --prompt and --image: save the first image with the boxes of the answer drawn",
    )
    sampling = parser.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    sampling.add_argument("--max-tokens", type=int, default=256)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--stop", action="append", help="stop string (repeatable)")
    sampling.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer with JSON that validates against the JSON schema in FILE (structured outputs)",
    )
    add_engine_arguments(parser)


def sampling_params_from_args(args: argparse.Namespace, defaults: dict[str, Any]):
    from vlm.sampling_params import SamplingParams

    values = dict(defaults)
    for field in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"):
        value = getattr(args, field)
        if value is not None:
            values[field] = value
    if getattr(args, "json_schema", None):
        values["structured_outputs"] = {"json": _read_json_schema(args.json_schema)}
    return SamplingParams(**values)


def _read_json_schema(path: str) -> Any:
    """The JSON schema in ``path`` (``--json-schema``); a missing or invalid file is a one-line error."""
    import json

    from vlm.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        raise ConfigError(f"--json-schema {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--json-schema {path}: not valid JSON ({exc})") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_command(args: argparse.Namespace) -> int:
    from vlm.llm import LLM

    # validate flags before the (slow) model load
    sampling_params_from_args(args, {})
    if args.draw_boxes and (args.prompt is None or not args.image):
        raise SystemExit("error: --draw-boxes needs --prompt and --image (the boxes are drawn on the first image)")
    llm = LLM(args.model, **engine_settings(args))
    params = sampling_params_from_args(args, llm.engine.default_sampling_values())
    if params.structured_outputs is not None:  # --json-schema: one it cannot compile fails before any chat
        llm.engine.structured.compile(params.structured_outputs)
    # VLM preprocessors may take the template from the processor's files (chat_template.json)
    has_template = bool(
        getattr(getattr(llm.engine, "preprocessor", None), "chat_template", None)
        or getattr(llm.tokenizer, "chat_template", None)
    )
    if args.prompt is not None:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt: Any = text
        if args.no_chat_template:
            # base checkpoints: the family's raw image form, then the text, no chat turn
            images = [_checked_image(path) for path in args.image or []]
            prompt = llm.engine.preprocessor.raw_prompt(text, images)
        elif args.image:
            prompt = _system(args) + [user_message(text, [_checked_image(path) for path in args.image])]
        elif has_template:
            prompt = _system(args) + [{"role": "user", "content": text}]
        if args.json:
            _answer_json(llm, prompt, params, args)
            return 0
        if args.draw_boxes:
            return _answer_and_draw(llm, prompt, params, args)
        for piece in llm.stream(prompt, params):
            _write(piece)
        _write("\n")
        return 0
    return chat_loop(llm, params, args, has_template)


def _answer_json(llm, prompt: Any, params, args: argparse.Namespace) -> Any:
    """Generate one answer and print it as one JSON object on a line of its own (``--json``);
    returns the final output. A request that fails is a :class:`VlmError` (one line on stderr).

    ``tokens_per_s`` is generated tokens over ``total_s``; both times count from before the
    prompt (and its pictures) is preprocessed."""
    import json
    import time

    from vlm.errors import VlmError

    started = time.perf_counter()
    inputs = llm.engine.preprocess(prompt)
    final, first_token_at = None, None
    for output in llm.engine.stream(inputs, params):
        if first_token_at is None and output.outputs[0].token_ids:
            first_token_at = time.perf_counter()
        final = output
    total = time.perf_counter() - started
    assert final is not None  # the stream ends with the finished output
    answer = final.outputs[0]
    if answer.finish_reason == "error":
        raise VlmError(answer.error or "generation failed")
    completion_tokens = len(answer.token_ids)
    record: dict[str, Any] = {
        "model": str(llm.engine.model_dir),
        "text": answer.text,
        "token_ids": list(answer.token_ids),
        "finish_reason": answer.finish_reason,
        "usage": {"prompt_tokens": len(final.prompt_token_ids), "completion_tokens": completion_tokens},
        "timings": {
            "ttft_s": round((first_token_at if first_token_at is not None else started + total) - started, 6),
            "total_s": round(total, 6),
            "tokens_per_s": round(completion_tokens / total, 3) if total > 0 else None,
        },
    }
    if args.draw_boxes:
        record["boxes"] = [{"label": b.label, "box": list(b.box), "space": b.space} for b in answer.boxes]
        _save_boxes(inputs, answer.boxes, args)
    _write(json.dumps(record) + "\n")
    return final


def _answer_and_draw(llm, prompt: Any, params, args: argparse.Namespace) -> int:
    """Stream the answer, then save the first image with the answer's grounding boxes drawn."""
    inputs = llm.engine.preprocess(prompt)
    final = None
    for output in llm.engine.stream(inputs, params):
        _write(output.outputs[0].delta)
        final = output
    _write("\n")
    _save_boxes(inputs, final.outputs[0].boxes if final is not None else [], args)
    return 0


def _save_boxes(inputs: Any, boxes: list[Any], args: argparse.Namespace) -> None:
    """Save the first image with ``boxes`` drawn (``--draw-boxes``); the boxes are listed on stderr."""
    from vlm.grounding import draw_boxes
    from vlm.inputs.images import load_image

    first = inputs.images[0] if inputs.images else None
    model_image_size = first.extra.get("resized_size") if first is not None else None
    draw_boxes(load_image(args.image[0]), boxes, model_image_size).save(args.draw_boxes)
    for box in boxes:
        print(f"box: {box.label or '(no label)'} {box.box} ({box.space})", file=sys.stderr)
    print(f"saved {args.draw_boxes} with {len(boxes)} box(es)", file=sys.stderr)


def user_message(text: str, images: list[Any]) -> dict[str, Any]:
    """A user turn; pictures go first, as OpenAI-style content parts."""
    if not images:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}],
    }


def _checked_image(path: str) -> Any:
    """Load a picture now, so a bad one is reported before the model runs (raises InputError)."""
    from vlm.inputs.images import load_image

    return load_image(path)


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def chat_loop(llm, params, args: argparse.Namespace, has_template: bool) -> int:
    from vlm.errors import InputError, VlmError

    interactive = sys.stdin.isatty()
    if not has_template:
        print("note: this model has no chat template; each line is sent as a raw prompt", file=sys.stderr)
    if interactive:
        print(f"chatting with {args.model}; {CHAT_HELP}", file=sys.stderr)
    history: list[dict[str, Any]] = _system(args)
    pending_images: list[Any] = []
    for path in args.image:
        pending_images.append(_checked_image(path))
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            history = _system(args)
            pending_images = []
            print("(history cleared)", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image") :].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
                continue
            try:
                pending_images.append(_checked_image(path))
            except InputError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"(attached {path}; it goes with your next message)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = history + [user_message(line, pending_images)]
        reply = []
        try:
            if args.json:  # one JSON object per answer, nothing else on stdout
                answer = _answer_json(llm, turn if has_template or pending_images else line, params, args)
                reply = [answer.outputs[0].text]
            else:
                for piece in llm.stream(turn if has_template or pending_images else line, params):
                    reply.append(piece)
                    _write(piece)
        except VlmError as exc:
            if reply and not args.json:
                _write("\n")
            print(f"error: {exc}", file=sys.stderr)
            continue
        if not args.json:
            _write("\n")
        pending_images = []
        history = turn + [{"role": "assistant", "content": "".join(reply)}]
