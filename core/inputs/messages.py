"""Chat messages in the OpenAI shape, and the image parts inside them.

A prompt is either a string (sent as is) or a list of chat messages in the OpenAI shape
(``{"role": "user", "content": "..."}``), rendered with the tokenizer's chat template.

A message's content may also be a list of parts, as OpenAI's API and transformers' chat templates
take them: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <source>}`` (also with
``"url"``, ``"path"`` or ``"base64"`` instead of ``"image"``) and
``{"type": "image_url", "image_url": {"url": ...}}``. :func:`normalize_messages` rewrites every
image part as ``{"type": "image", "image": <source>}`` (what transformers' templates test for) and
:func:`iter_image_parts` lists the sources in prompt order; ``vlm.inputs.load_image`` loads them.
An image part may also set its own budget (:data:`IMAGE_OPTION_KEYS`): OpenAI's ``detail``
(``"low"``, ``"high"``, ``"auto"``; inside ``image_url`` too), qwen-vl-utils' ``min_pixels`` /
``max_pixels`` and tiling families' ``max_num_tiles``; :func:`image_part_options` lists them in
prompt order (families without budgets ignore them).
:func:`text_content_as` gives text contents the form (string or parts) a chat template renders.

Video parts, for models whose preprocessor reads video (``normalize_messages(..., videos=True)``;
for every other model a video part is a one-line refusal): ``{"type": "video", "video": <source>}``
(also with ``"url"`` or ``"path"``), where the source is a video file (path, ``file://`` or
``data:video/...`` URL, bytes; see :mod:`vlm.inputs.video`) or a list of frames (each an image
source, as qwen-vl-utils takes them), and OpenAI-style ``{"type": "video_url", "video_url":
{"url": ...}}``. Both become ``{"type": "video", "video": <source>}``, with the part's own sampling
and budget options (:data:`VIDEO_OPTION_KEYS`, qwen-vl-utils' names; inside ``video_url`` too).
:func:`iter_media_parts` lists images and videos together in prompt order.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any

from vlm.errors import InputError
from vlm.inputs.data import Message


def validate_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise InputError(f"message {i} has role {message['role']!r}; use system, user, assistant or tool")
    return messages


IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
#: an image part's own budget: OpenAI's ``detail``, qwen-vl-utils' ``min_pixels`` / ``max_pixels``,
#: tiles per picture for tiling families (InternVL)
IMAGE_OPTION_KEYS = ("detail", "min_pixels", "max_pixels", "max_num_tiles")
DETAILS = ("low", "high", "auto")

VIDEO_SOURCE_KEYS = ("video", "url", "path")
#: a video part's own sampling and budget (qwen-vl-utils' names): frames per second to sample
#: (or, for a list of frames, the rate they were taken at), a fixed frame count instead, bounds on
#: the frame count, and pixel budgets per frame and for the whole video
VIDEO_OPTION_KEYS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels")


def _image_options(part: dict[str, Any], where: str) -> dict[str, Any]:
    """The budget options of an image part (``detail`` may sit inside ``image_url``), checked."""
    options = {key: part[key] for key in IMAGE_OPTION_KEYS if part.get(key) is not None}
    inner = part.get("image_url")
    if isinstance(inner, dict) and inner.get("detail") is not None:
        options.setdefault("detail", inner["detail"])
    if "detail" in options and options["detail"] not in DETAILS:
        raise InputError(f"{where}: detail must be 'low', 'high' or 'auto', not {options['detail']!r}")
    for key in ("min_pixels", "max_pixels"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InputError(f"{where}: {key} must be a positive number of pixels (width x height), not {value!r}")
    tiles = options.get("max_num_tiles")
    if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles <= 0):
        raise InputError(f"{where}: max_num_tiles must be a positive whole number of tiles, not {tiles!r}")
    if options.get("min_pixels", 0) > options.get("max_pixels", float("inf")):
        raise InputError(f"{where}: min_pixels ({options['min_pixels']}) exceeds max_pixels ({options['max_pixels']})")
    return options


def _image_source(part: dict[str, Any], where: str) -> Any:
    """The image source of an image part (``type`` "image" or "image_url")."""
    if part["type"] == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not url:
            raise InputError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
        return url
    keys = [key for key in IMAGE_SOURCE_KEYS if part.get(key) is not None]
    if len(keys) != 1:
        found = f"got {', '.join(map(repr, keys))}" if keys else "got none"
        raise InputError(f"{where}: an image part needs exactly one of 'image', 'url', 'path' or 'base64' ({found})")
    source = part[keys[0]]
    if keys[0] == "base64":
        if not isinstance(source, str):
            raise InputError(f"{where}: 'base64' must be a string of base64 image data")
        try:
            return base64.b64decode(source.split(",", 1)[-1], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{where}: 'base64' is not valid base64 ({exc}); re-encode the image") from None
    return source


def _video_source(part: dict[str, Any], where: str) -> Any:
    """The video source of a video part (``type`` "video" or "video_url"): a file or a list of frames."""
    if part["type"] == "video_url":
        value = part.get("video_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not url or not isinstance(url, str):
            raise InputError(f"{where}: a video_url part needs {{'video_url': {{'url': ...}}}}")
        return url
    keys = [key for key in VIDEO_SOURCE_KEYS if part.get(key) is not None]
    if len(keys) != 1:
        found = f"got {', '.join(map(repr, keys))}" if keys else "got none"
        raise InputError(f"{where}: a video part needs exactly one of 'video', 'url' or 'path' ({found})")
    source = part[keys[0]]
    if isinstance(source, (list, tuple)) and not source:
        raise InputError(f"{where}: a video given as frames needs at least one frame")
    return list(source) if isinstance(source, tuple) else source


def _video_options(part: dict[str, Any], where: str) -> dict[str, Any]:
    """The sampling and budget options of a video part (they may sit inside ``video_url``), checked."""
    inner = part.get("video_url")
    options = {key: inner[key] for key in VIDEO_OPTION_KEYS if isinstance(inner, dict) and inner.get(key) is not None}
    options.update({key: part[key] for key in VIDEO_OPTION_KEYS if part.get(key) is not None})
    for key, value in options.items():
        if key == "fps":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InputError(f"{where}: fps must be a positive number of frames per second, not {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            unit = "pixels (width x height)" if key.endswith("pixels") else "frames"
            raise InputError(f"{where}: {key} must be a positive number of {unit}, not {value!r}")
    if "fps" in options and "nframes" in options:
        raise InputError(f"{where}: fps and nframes both choose how many frames to take; send one of them")
    for low, high in (("min_frames", "max_frames"), ("min_pixels", "max_pixels")):
        if options.get(low, 0) > options.get(high, float("inf")):
            raise InputError(f"{where}: {low} ({options[low]}) exceeds {high} ({options[high]})")
    return options


def normalize_messages(messages: Any, videos: bool = False) -> list[Message]:
    """Validate messages and rewrite content parts into the shape chat templates expect.

    String contents are kept; list contents become ``{"type": "text", "text": ...}``,
    ``{"type": "image", "image": <source>}`` and (with ``videos``) ``{"type": "video", "video":
    <source>}`` parts. The input is not modified.

    :param videos: the model reads video; otherwise a video part is refused.
    :raises InputError: a malformed message or part, a part type other than text / image (/ video).
    """
    out = []
    for i, message in enumerate(validate_messages(messages)):
        content = message["content"]
        if isinstance(content, str) or content is None:
            out.append(dict(message))
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i} content must be a string or a list of parts, not {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            where = f"message {i} part {j}"
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, dict) or "type" not in part:
                raise InputError(f"{where} must be a dict with a 'type' ('text' or 'image'), got {part!r:.80}")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"{where}: a text part needs {{'text': <string>}}")
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] in ("image", "image_url"):
                parts.append({"type": "image", "image": _image_source(part, where), **_image_options(part, where)})
            elif part["type"] in ("video", "video_url"):
                if not videos:
                    raise InputError(
                        f"{where} is a video, which this model does not read; send its frames as images, or serve "
                        "a model whose plugin reads video"
                    )
                parts.append({"type": "video", "video": _video_source(part, where), **_video_options(part, where)})
            else:
                kinds = (
                    "'text', 'image', 'image_url', 'video' and 'video_url'"
                    if videos
                    else "'text', 'image' and 'image_url'"
                )
                raise InputError(f"{where} has type {part['type']!r}; this model takes {kinds} parts")
        out.append({**message, "content": parts})
    return out


def text_content_as(messages: list[Message], form: str) -> list[Message]:
    """Normalized messages with their text contents in ``form``: ``"parts"`` makes a string content
    one text part, ``"string"`` joins a content of text parts only; anything else is kept (a
    content with images is the preprocessor's to shape). The input is not modified."""
    out = []
    for message in messages:
        content = message.get("content")
        if form == "parts" and isinstance(content, str):
            message = {**message, "content": [{"type": "text", "text": content}]}
        elif form == "string" and isinstance(content, list) and all(p["type"] == "text" for p in content):
            message = {**message, "content": "".join(p["text"] for p in content)}
        out.append(message)
    return out


def content_list(messages: list[Message]) -> list[dict[str, Any]]:
    """Every message's content as one flat list of parts, in order (a string content becomes a
    text part): what a template that iterates ``messages`` as content parts takes (Qwen2-VL's
    base checkpoints). Such a template has no roles, so turns run together."""
    parts: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            parts.extend(content)
    return parts


def iter_image_parts(messages: list[Message]) -> Iterator[Any]:
    """The image sources of (normalized or raw) messages, in prompt order."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                yield _image_source(part, f"message {i} part {j}")


def image_part_options(messages: list[Message]) -> list[dict[str, Any]]:
    """The budget options (:data:`IMAGE_OPTION_KEYS`) of each image part, in prompt order ({} for none)."""
    options = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                options.append(_image_options(part, f"message {i} part {j}"))
    return options


def iter_media_parts(messages: list[Message]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(kind, source, options)`` of every image and video part of (normalized or raw) messages, in
    prompt order: ``kind`` is ``"image"`` or ``"video"``, ``options`` the part's budget
    (:data:`IMAGE_OPTION_KEYS`) or sampling (:data:`VIDEO_OPTION_KEYS`) options."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"message {i} part {j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "image_url"):
                yield "image", _image_source(part, where), _image_options(part, where)
            elif kind in ("video", "video_url"):
                yield "video", _video_source(part, where), _video_options(part, where)


def has_video_parts(prompt: Any) -> bool:
    """Does this prompt (a string, token ids or messages) carry videos?"""
    if not isinstance(prompt, list):
        return False
    return any(
        isinstance(part, dict) and part.get("type") in ("video", "video_url")
        for message in prompt
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


def has_image_parts(prompt: Any) -> bool:
    """Does this prompt (a string, token ids or messages) carry images?"""
    if not isinstance(prompt, list):
        return False
    return any(True for _ in iter_image_parts([m for m in prompt if isinstance(m, dict)]))
