"""``vlmrun --model DIR``: one-shot generation with ``--prompt``, otherwise an interactive chat.

Generated text goes to stdout and nothing else does; logs and the chat prompt go to stderr.
Pictures (``--image``) and videos (``--video``, for models whose plugin reads video) are paths,
``file://`` or ``data:`` URLs, and with ``--allow-remote-media`` also ``http(s)://`` URLs. ``--draw-boxes OUT.png`` saves the picture with the answer's grounding boxes
drawn (the plugin's ``parse_grounding`` hook finds them): once in one-shot mode, per answer in a
chat (``OUT-1.png``, ``OUT-2.png``, ...), the file name printed on stderr each time.

An interactive chat (a terminal on stdin) with a VLM starts each conversation as CogVLM's own chat
demo does: it asks for a picture's path, Enter for a text-only conversation (unless ``--image``
already gave one). Piped input is read as turns only, so scripts keep working.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlm.cli.engine_args import add_engine_arguments, engine_settings

CHAT_HELP = (
    "commands: /image PATH (or URL, with --allow-remote-media) attaches a picture to your next message, "
    "/video PATH a video, /clear starts over, /exit (or Ctrl-D) quits"
)
#: what an interactive chat with a VLM asks at the start of each conversation (CogVLM's "image path >>>>>")
PICTURE_PROMPT = "image path (Enter for text only): "


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"Without --prompt: an interactive chat that keeps the history; {CHAT_HELP}. With a VLM and no "
        f"--image, each conversation starts by asking {PICTURE_PROMPT.strip()!r} (when stdin is a terminal)."
    )
    parser.add_argument("--prompt", "-p", help="generate once for this prompt and exit; '-' reads stdin")
    parser.add_argument(
        "--image",
        "-i",
        action="append",
        default=[],
        metavar="PATH",
        help="picture for the prompt (repeatable; with chat: attached to the first message). Without it, an "
        "interactive chat with a VLM asks for a picture's path at the start of each conversation "
        "(after /clear too); press Enter there for a text-only conversation",
    )
    parser.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="video file for the prompt, after the pictures (repeatable; with chat: attached to the first "
        "message); for models whose plugin reads video, e.g. Qwen2-VL; decoding needs PyAV (pip install av)",
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
        help="save the picture the answer is about (the last one given) with the answer's grounding boxes "
        "drawn; with --prompt it needs --image; in a chat, each answer is saved as OUT-1.png, OUT-2.png, ...",
    )
    parser.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="let --image, --video, /image and /video fetch http(s):// URLs (refused by default)",
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
    if args.draw_boxes:
        if args.prompt is not None and not args.image:
            raise SystemExit("error: --draw-boxes with --prompt needs --image (the boxes are drawn on that picture)")
        _check_picture_name(args.draw_boxes)
    for path in args.image:
        _check_media_policy(path, args)
    for path in args.video:
        _check_media_policy(path, args, "video")
    if args.video and args.no_chat_template:
        from vlm.errors import ConfigError

        raise ConfigError("--video needs the chat template (its video part); drop --no-chat-template")
    llm = LLM(args.model, **engine_settings(args))
    params = sampling_params_from_args(args, llm.engine.default_sampling_values())
    if params.structured_outputs is not None:  # --json-schema: one it cannot compile fails before any chat
        llm.engine.structured.compile(params.structured_outputs)
    has_template = _takes_chat_messages(llm)
    if args.prompt is not None:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt: Any = text
        images = [_checked_image(path, args) for path in args.image]
        videos = [_checked_video(path, args) for path in args.video]
        if args.no_chat_template:
            # base checkpoints: the family's raw image form, then the text, no chat turn
            prompt = llm.engine.preprocessor.raw_prompt(text, images)
        elif images or videos:
            prompt = _system(args) + [user_message(text, images, videos)]
        elif has_template:
            prompt = _system(args) + [{"role": "user", "content": text}]
        drawing = _Drawing(args.draw_boxes, images[-1] if images else None) if args.draw_boxes else None
        if args.json:
            _answer_json(llm, prompt, params, args, drawing)
            return 0
        if drawing is not None:
            _save_boxes(drawing, _stream_answer(llm, prompt, params).boxes)
            return 0
        for piece in llm.stream(prompt, params):
            _write(piece)
        _write("\n")
        return 0
    return chat_loop(llm, params, args, has_template)


def _takes_chat_messages(llm) -> bool:
    """Whether prompts go to the model as chat messages (else as raw text): it has a chat template
    (VLM preprocessors may take it from the processor's files, chat_template.json), or its
    preprocessor renders conversations its own way (CogVLM's ``template_version``), which only
    trying one tells."""
    from vlm.errors import InputError

    if getattr(getattr(llm.engine, "preprocessor", None), "chat_template", None) or getattr(
        llm.tokenizer, "chat_template", None
    ):
        return True
    try:
        llm.engine.preprocess([{"role": "user", "content": "Hi"}])
    except InputError:  # "this model has no chat template ..."
        return False
    return True


def _answer_json(llm, prompt: Any, params, args: argparse.Namespace, drawing: _Drawing | None = None) -> Any:
    """Generate one answer and print it as one JSON object on a line of its own (``--json``);
    returns the final output. A request that fails is a :class:`VlmError` (one line on stderr).
    With ``drawing`` (``--draw-boxes``), the record lists the boxes and the picture is saved.

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
    if drawing is not None:
        record["boxes"] = [{"label": b.label, "box": list(b.box), "space": b.space} for b in answer.boxes]
        _save_boxes(drawing, answer.boxes)
    _write(json.dumps(record) + "\n")
    return final


def _stream_answer(llm, prompt: Any, params) -> Any:
    """Stream one answer to stdout (a newline after it) and return its final ``CompletionOutput``
    (with the grounding boxes); a failed request is a :class:`VlmError`."""
    from vlm.errors import VlmError

    final = None
    try:
        for output in llm.engine.stream(prompt, params):
            _write(output.outputs[0].delta)
            final = output.outputs[0]
    finally:
        if final is not None:  # ends the line, also when the stream fails half way
            _write("\n")
    assert final is not None  # the stream ends with the finished output
    if final.finish_reason == "error":
        raise VlmError(final.error or "generation failed")
    return final


class _Drawing:
    """Where ``--draw-boxes`` saves the answer's boxes, and on which picture.

    One-shot: ``path`` itself. A chat numbers its answers: the n-th is saved as ``STEM-n.SUFFIX``
    next to ``path`` (``out.png`` -> ``out-1.png``, ``out-2.png``, ...), so no turn overwrites another
    (CogVLM's own chat demo overwrites one file each turn)."""

    def __init__(self, path: str, picture: Any | None, numbered: bool = False):
        self.path = path
        self.picture = picture  # the picture the next answer is about: the latest one given
        self.numbered = numbered
        self.answers = 0

    def next_path(self) -> str:
        """The file for the next answer (counted even when it has no picture to draw on)."""
        from pathlib import Path

        self.answers += 1
        if not self.numbered:
            return self.path
        path = Path(self.path)
        return str(path.with_name(f"{path.stem}-{self.answers}{path.suffix}"))


def _save_boxes(drawing: _Drawing, boxes: list[Any]) -> None:
    """Save the picture with ``boxes`` (pixels of that picture) drawn; the boxes and the file name
    are printed on stderr. An answer without a picture (a text-only chat so far) saves nothing."""
    from vlm.errors import VlmError
    from vlm.grounding import draw_boxes

    path = drawing.next_path()
    if drawing.picture is None:
        print("(no picture in this conversation yet: no boxes to draw)", file=sys.stderr)
        return
    try:
        draw_boxes(drawing.picture, boxes).save(path)
    except OSError as exc:
        raise VlmError(f"--draw-boxes: cannot save {path} ({exc.strerror or exc}); check the directory") from None
    for box in boxes:
        coords = ", ".join(f"{v:g}" for v in box.box)
        print(f"box: {box.label or '(no label)'} ({coords})", file=sys.stderr)
    print(f"saved {path} with {len(boxes)} box(es)", file=sys.stderr)


def _check_picture_name(path: str) -> None:
    """``--draw-boxes`` must name a file PIL can write, by its extension (checked before the model loads)."""
    from pathlib import Path

    from PIL import Image

    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise SystemExit(f"error: --draw-boxes {path}: name a picture file, e.g. boxes.png or boxes.jpg")


def user_message(text: str, images: list[Any], videos: list[Any] | None = None) -> dict[str, Any]:
    """A user turn; pictures go first, then videos, as content parts (``{"type": "video", "video":
    <source>}`` is vlm's video part, :mod:`vlm.inputs.messages`)."""
    videos = videos or []
    if not images and not videos:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [
            *({"type": "image", "image": image} for image in images),
            *({"type": "video", "video": video} for video in videos),
            {"type": "text", "text": text},
        ],
    }


def _check_media_policy(path: str, args: argparse.Namespace, kind: str = "image") -> None:
    """A remote picture or video (``kind``) needs ``--allow-remote-media`` (raises InputError, one
    line, naming the flag)."""
    from vlm.errors import InputError
    from vlm.inputs.images import is_remote_url

    if is_remote_url(path) and not args.allow_remote_media:
        shown = path if len(path) <= 60 else path[:40] + "..." + path[-17:]
        thing = "picture" if kind == "image" else "video"
        raise InputError(
            f"{kind} {shown!r}: remote {kind} URLs are not fetched unless you pass --allow-remote-media; "
            f"pass it, or download the {thing} and give its path"
        )


def _checked_video(path: str, args: argparse.Namespace) -> Any:
    """Read (or, with ``--allow-remote-media``, download) a video now, so a missing file or a
    refused URL is reported before the model runs (raises InputError). Returns what the video part
    holds: the file's path, or the downloaded bytes; the model's plugin decodes it (or refuses
    video in one line)."""
    from vlm.inputs.video import read_video_source

    _check_media_policy(path, args, "video")
    return read_video_source(path, allow_remote=args.allow_remote_media)


def _checked_image(path: str, args: argparse.Namespace) -> Any:
    """Load (or, with ``--allow-remote-media``, fetch) a picture now, so a bad one is reported
    before the model runs (raises InputError)."""
    from vlm.inputs.images import load_image

    _check_media_policy(path, args)
    return load_image(path, allow_remote=args.allow_remote_media)


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


#: what :func:`_ask_for_picture` returns when the user quits instead of answering
_QUIT = object()


def _takes_pictures(llm) -> bool:
    """Whether the loaded model reads pictures: a VLM whose checkpoint has its vision tower."""
    engine = llm.engine
    multimodal = bool(getattr(getattr(engine, "model_config", None), "is_multimodal", False))
    return multimodal and bool(getattr(getattr(engine, "preprocessor", None), "supports_images", True))


def _ask_for_picture(args: argparse.Namespace) -> Any:
    """Ask for the picture a new conversation is about, as CogVLM's chat demo does: a path (or
    URL, with ``--allow-remote-media``) is loaded now, Enter means a text-only conversation.
    A picture that cannot be loaded is reported and asked for again.

    :return: the picture, ``None`` for text only, or :data:`_QUIT` on EOF or ``/exit``.
    """
    from vlm.errors import InputError

    while True:
        print(PICTURE_PROMPT, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            return _QUIT
        answer = line.strip()
        if answer in ("/exit", "/quit"):
            return _QUIT
        if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "'\"":
            answer = answer[1:-1]  # terminals quote a dropped file's path
        if not answer:
            print("(no picture: a text-only conversation; /image PATH attaches one later)", file=sys.stderr)
            return None
        try:
            picture = _checked_image(answer, args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"(attached {answer}; it goes with your first message)", file=sys.stderr)
        return picture


def chat_loop(llm, params, args: argparse.Namespace, has_template: bool) -> int:
    from vlm.errors import InputError, VlmError

    interactive = sys.stdin.isatty()
    if not has_template:
        print("note: this model has no chat template; each line is sent as a raw prompt", file=sys.stderr)
    if interactive:
        print(f"chatting with {args.model}; {CHAT_HELP}", file=sys.stderr)
    history: list[dict[str, Any]] = _system(args)
    pending_images: list[Any] = []
    pending_videos: list[Any] = []
    for path in args.image:
        pending_images.append(_checked_image(path, args))
    for path in args.video:
        pending_videos.append(_checked_video(path, args))
    # a person at a VLM's chat is asked for the picture first (a script pipes turns only)
    asks_for_picture = interactive and _takes_pictures(llm)
    ask_picture_now = asks_for_picture and not pending_images and not pending_videos
    # --draw-boxes: each answer's boxes on the conversation's latest picture, OUT-1.png, OUT-2.png, ...
    drawing = _Drawing(args.draw_boxes, None, numbered=True) if args.draw_boxes else None
    conversation_picture: Any | None = None  # the latest picture sent in this conversation
    while True:
        if ask_picture_now:
            ask_picture_now = False
            answer = _ask_for_picture(args)
            if answer is _QUIT:
                return 0
            if answer is not None:
                pending_images.append(answer)
            continue
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
            pending_images, pending_videos = [], []
            conversation_picture = None
            print("(history cleared)", file=sys.stderr)
            ask_picture_now = asks_for_picture
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image") :].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
                continue
            try:
                pending_images.append(_checked_image(path, args))
            except InputError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"(attached {path}; it goes with your next message)", file=sys.stderr)
            continue
        if line == "/video" or line.startswith("/video "):
            path = line[len("/video") :].strip()
            if not path:
                print("usage: /video PATH", file=sys.stderr)
                continue
            try:
                pending_videos.append(_checked_video(path, args))
            except InputError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"(attached {path}; it goes with your next message)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = history + [user_message(line, pending_images, pending_videos)]
        prompt = turn if has_template or pending_images or pending_videos else line
        picture = pending_images[-1] if pending_images else conversation_picture
        if drawing is not None:
            drawing.picture = picture
        reply = []
        boxes: list[Any] | None = None  # to draw, once the turn is in the history
        try:
            if args.json:  # one JSON object per answer, nothing else on stdout
                answer = _answer_json(llm, prompt, params, args, drawing)
                reply = [answer.outputs[0].text]
            elif drawing is not None:
                final = _stream_answer(llm, prompt, params)
                reply, boxes = [final.text], final.boxes
            else:
                for piece in llm.stream(prompt, params):
                    reply.append(piece)
                    _write(piece)
                _write("\n")
        except VlmError as exc:
            if reply and not args.json and drawing is None:
                _write("\n")
            print(f"error: {exc}", file=sys.stderr)
            if pending_images or pending_videos:  # kept, media the model refused would fail every later message too
                dropped = "picture" if not pending_videos else "video" if not pending_images else "media"
                command = "/image" if not pending_videos else "/video" if not pending_images else "/image or /video"
                pending_images, pending_videos = [], []
                print(
                    f"(the {dropped} attached to that message was dropped; {command} attaches one again)",
                    file=sys.stderr,
                )
            continue
        pending_images, pending_videos = [], []
        conversation_picture = picture
        history = turn + [{"role": "assistant", "content": "".join(reply)}]
        if drawing is not None and boxes is not None:
            try:
                _save_boxes(drawing, boxes)
            except VlmError as exc:  # the answer stands; only its picture is lost
                print(f"error: {exc}", file=sys.stderr)
