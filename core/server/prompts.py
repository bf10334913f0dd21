"""A request's prompt as the engine's ``ModelInputs``: chat messages (with their images) or a completion prompt.

Images in chat messages (``image_url`` parts) are loaded here under the server's media policy:
``data:`` URLs always; ``file://`` URLs and plain paths only inside ``allowed_media_dir``;
``http(s)://`` only with ``allow_remote_media``. They reach the plugin's preprocessor as decoded
PIL images (``{"type": "image", "image": <PIL.Image>}`` parts).

A request is built in stages, so that a hostile one holds nothing that others need
(:class:`MediaLimits` sets the limits):

1. On the event loop: the media policy, and whether the model takes images at all (cheap).
2. Without images, the prompt is rendered and tokenized in the engine's ``text`` pool, which image
   work never enters: a text request never waits behind a download or a decoder.
3. With images, the ``media`` pool reads each image's bytes and header, up to
   :data:`FETCHES_PER_REQUEST` of a request's images at once (downloads bounded in time and
   size), and the request's total pixel count is checked against ``max_request_pixels`` before
   anything is decoded.
4. The request then waits for room in the server-wide :class:`PixelBudget`
   (``max_inflight_pixels``) and is decoded and preprocessed in the ``preprocess`` pool; the
   pixels are given back when that work ends. A request that waits longer than
   ``pixel_wait_timeout`` gets a 503 (retry later) rather than queueing without end.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.errors import InputError
from vlm.inputs.images import (
    MAX_PIXELS,
    MAX_REMOTE_BYTES,
    REMOTE_TIMEOUT_S,
    ImageLimitError,
    OpenedImage,
    check_pixel_budget,
    open_image,
)
from vlm.inputs.messages import VIDEO_OPTION_KEYS
from vlm.inputs.video import read_video_source
from vlm.server.async_engine import AsyncEngine, EngineStoppedError
from vlm.server.errors import RequestError, message_param
from vlm.server.protocol import ChatMessage, ContentPart, ImageURL, VideoURL

#: the ``vlmrun serve`` flag that sets each limit, named in the error that limit causes
LIMIT_FLAGS = {
    "pixels": "--max-request-pixels",
    "request_pixels": "--max-request-pixels",
    "remote_timeout": "--remote-media-timeout",
    "remote_bytes": "--remote-media-max-bytes",
}


#: images of one request read (downloaded) at the same time, in the engine's media pool
FETCHES_PER_REQUEST = 4


@dataclass(frozen=True)
class MediaLimits:
    """How much of the server one request's images may use."""

    #: seconds one remote image's whole download may take
    remote_timeout: float = REMOTE_TIMEOUT_S
    #: bytes one remote image may have
    remote_max_bytes: int = MAX_REMOTE_BYTES
    #: pixels (width x height, summed over its images) one request may have
    max_request_pixels: int = MAX_PIXELS
    #: pixels being decoded and preprocessed at once, over all requests
    max_inflight_pixels: int = 2 * MAX_PIXELS
    #: seconds a request waits for room in ``max_inflight_pixels`` before a 503
    pixel_wait_timeout: float = 60.0

    def check(self) -> None:
        """One-line errors naming the flag for settings that cannot work."""
        for value, flag in (
            (self.remote_timeout, "--remote-media-timeout"),
            (self.remote_max_bytes, "--remote-media-max-bytes"),
            (self.max_request_pixels, "--max-request-pixels"),
            (self.max_inflight_pixels, "--max-inflight-pixels"),
            (self.pixel_wait_timeout, "pixel_wait_timeout"),
        ):
            if not value > 0:
                raise InputError(f"{flag} must be positive, not {value}")
        if self.max_inflight_pixels < self.max_request_pixels:
            raise InputError(
                f"--max-inflight-pixels ({self.max_inflight_pixels:,}) is below --max-request-pixels "
                f"({self.max_request_pixels:,}): the largest request allowed could never run; raise it"
            )


class PixelBudget:
    """Pixels in flight, server-wide: :meth:`acquire` waits (first come, first served) until the
    request fits, :meth:`release` gives them back. Used from one event loop."""

    def __init__(self, limit: int, wait_timeout: float):
        self.limit = limit
        self.wait_timeout = wait_timeout
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._closed = False

    async def acquire(self, pixels: int) -> None:
        """Wait until ``pixels`` more fit; a 503 after ``wait_timeout`` seconds or once closed."""
        if self._closed:
            raise EngineStoppedError("the server is shutting down")
        if not self._waiters and self.in_use + pixels <= self.limit:
            self.in_use += pixels
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_timeout)
        except asyncio.TimeoutError:
            if not _granted(waiter):
                self._leave(entry)
                raise self._busy(pixels, time.monotonic() - started) from None
        except asyncio.CancelledError:
            if _granted(waiter):
                self.release(pixels)
            else:
                self._leave(entry)
            raise

    @property
    def num_waiting(self) -> int:
        return sum(1 for _, waiter in self._waiters if not waiter.done())

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._wake()

    def close(self) -> None:
        """Refuse new requests and wake the waiting ones with :class:`EngineStoppedError`."""
        self._closed = True
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(EngineStoppedError("the server is shutting down"))

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        if entry in self._waiters:
            self._waiters.remove(entry)
        if not entry[1].done():
            entry[1].cancel()
        self._wake()  # those behind it may fit now

    def _wake(self) -> None:
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if waiter.done():  # timed out or cancelled meanwhile
                self._waiters.popleft()
                continue
            if self.in_use + pixels > self.limit:
                return
            self._waiters.popleft()
            self.in_use += pixels
            waiter.set_result(None)

    def _busy(self, pixels: int, waited: float) -> RequestError:
        return RequestError(
            f"the server is busy decoding other requests' images: this request's {pixels:,} pixels did not fit "
            f"in the {self.limit:,} allowed in flight (--max-inflight-pixels) within {waited:.0f} s; retry later",
            status=503,
            type="server_error",
            code="server_busy",
        )


def _granted(waiter: asyncio.Future) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class PromptBuilder:
    """Builds ``ModelInputs`` with the engine's preprocessor (:meth:`chat_inputs`, :meth:`completion_inputs`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        served_model_name: str,
        allowed_media_dir: str | None,
        allow_remote_media: bool,
        limits: MediaLimits | None = None,
    ):
        self.engine = engine
        self.served_model_name = served_model_name
        self.allowed_dir = Path(allowed_media_dir).expanduser().resolve() if allowed_media_dir else None
        self.allow_remote_media = allow_remote_media
        self.limits = limits or MediaLimits()
        self.pixels = PixelBudget(
            max(self.limits.max_inflight_pixels, self.limits.max_request_pixels), self.limits.pixel_wait_timeout
        )

    # -- the stages (on the event loop) ------------------------------------------------------------

    async def chat_inputs(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> Any:
        """``messages`` as model inputs; ``tools`` (function definitions) go to the chat template."""
        images = self.image_parts(messages)
        if not images and not self.video_parts(messages):
            return await self.engine.run_in_pool(self.chat, messages, [], tools, pool="text")
        # several at once (a request's downloads take the longest one's time, not the sum), but
        # never so many that one request holds the whole media pool
        fetching = asyncio.Semaphore(FETCHES_PER_REQUEST)

        async def fetch(url: str, where: str) -> OpenedImage:
            async with fetching:
                return await self.engine.run_in_pool(self.open_image, url, where, pool="media")

        loaded = await asyncio.gather(*(fetch(url, where) for where, url in images))
        opened = [(where, image) for (where, _), image in zip(images, loaded)]
        try:
            pixels = self.check_request_pixels(opened)
            await self.pixels.acquire(pixels)
        except BaseException:
            for _, image in opened:
                image.close()
            raise
        release = functools.partial(self.pixels.release, pixels)
        return await self.engine.run_in_pool(self.chat, messages, opened, tools, on_done=release)

    async def completion_inputs(self, prompt: Any) -> Any:
        return await self.engine.run_in_pool(self.completion, prompt, pool="text")

    def image_parts(self, messages: list[ChatMessage]) -> list[tuple[str, str]]:
        """``(field, url)`` of every image part (and every frame of a video given as frames), in
        order, once the media policy allowed each."""
        parts = []
        for i, message in enumerate(messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type == "image_url":
                        parts.append((f"messages[{i}].content[{j}].image_url", part.url))
                    elif part.frames is not None:  # a video given as frames: each one an image
                        frames = enumerate(part.frames)
                        parts.extend((f"messages[{i}].content[{j}].video[{k}]", url) for k, url in frames)
        if parts and not self.engine.is_multimodal:
            raise RequestError(f"{self.served_model_name!r} is a text-only model; send no images", parts[0][0])
        for where, url in parts:
            self.check_policy(url, where)
        return parts

    def video_parts(self, messages: list[ChatMessage]) -> list[tuple[str, str]]:
        """``(field, url)`` of every video file part, in order, once the media policy allowed each."""
        parts = [
            (f"messages[{i}].content[{j}].{part.type}", part.url)
            for i, message in enumerate(messages)
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if part.type in ("video", "video_url") and part.frames is None
        ]
        if parts and not self.engine.is_multimodal:
            raise RequestError(f"{self.served_model_name!r} is a text-only model; send no videos", parts[0][0])
        for where, url in parts:
            self.check_policy(url, where, kind="video")
        return parts

    # -- blocking work (in the engine's pools) -------------------------------------------------------

    def check_request_pixels(self, opened: list[tuple[str, OpenedImage]]) -> int:
        """The request's pixel count (from the headers); a 400 if it is over ``max_request_pixels``."""
        try:
            return check_pixel_budget([image for _, image in opened], self.limits.max_request_pixels)
        except ImageLimitError as exc:
            raise RequestError(_with_flag(exc), opened[0][0] if len(opened) == 1 else "messages") from None

    def chat(
        self,
        messages: list[ChatMessage],
        opened: list[tuple[str, OpenedImage]],
        tools: list[dict[str, Any]] | None = None,
    ) -> Any:
        """Decode the images and preprocess the conversation (with ``tools`` for the template)."""
        from vlm.server.tools import template_message

        converted = []
        images = iter(opened)
        try:
            for index, message in enumerate(messages):
                role = "system" if message.role == "developer" else message.role
                content: Any = message.content if message.content is not None else ""
                if isinstance(content, list):
                    parts: list[dict[str, Any]] = []
                    for j, part in enumerate(content):
                        if part.type == "text":
                            parts.append({"type": "text", "text": part.text})
                        elif part.type in ("video", "video_url"):
                            parts.append(self.video_part(part, images, f"messages[{index}].content[{j}].{part.type}"))
                        else:
                            where, image = next(images)
                            try:
                                parts.append({"type": "image", "image": image.decode(), **_image_budget(part)})
                            except InputError as exc:
                                raise RequestError(str(exc), where) from None
                    content = parts  # the preprocessor joins text parts for text-only templates
                item = {"role": role, "content": content}
                if message.name:
                    item["name"] = message.name
                item.update(template_message(message, index))  # tool calls and results
                converted.append(item)
            try:
                return self.engine.preprocess(converted, tools)
            except InputError as exc:
                raise RequestError(str(exc), message_param(str(exc))) from None
        finally:
            for _, image in opened:
                image.close()  # the pixels go now, not when the request finishes

    def video_part(self, part: ContentPart, images: Any, where: str) -> dict[str, Any]:
        """A video part for the preprocessor: its frames decoded (opened with the images), or its
        file read under the media policy; with its sampling options."""
        inner = part.video_url.model_extra if isinstance(part.video_url, VideoURL) else None
        extra = {**(inner or {}), **(part.model_extra or {})}
        options = {key: extra[key] for key in VIDEO_OPTION_KEYS if extra.get(key) is not None}
        if part.frames is not None:
            frames = []
            for _ in part.frames:
                frame_where, image = next(images)
                try:
                    frames.append(image.decode())
                except InputError as exc:
                    raise RequestError(str(exc), frame_where) from None
            return {"type": "video", "video": frames, **options}
        self.check_policy(part.url, where, kind="video")
        try:
            source = read_video_source(
                part.url,
                allowed_dir=self.allowed_dir,
                allow_remote=self.allow_remote_media,
                remote_timeout=self.limits.remote_timeout,
                max_remote_bytes=self.limits.remote_max_bytes,
            )
        except ImageLimitError as exc:
            raise RequestError(_with_flag(exc), where) from None
        except InputError as exc:
            raise RequestError(str(exc), where) from None
        return {"type": "video", "video": source, **options}

    def completion(self, prompt: Any) -> Any:
        try:
            return self.engine.preprocess(prompt)
        except InputError as exc:
            raise RequestError(str(exc), "prompt") from None

    def check_policy(self, url: str, where: str, kind: str = "image") -> None:
        """Refuse ``url`` if the media policy does not allow it; ``where`` is the field named in a
        refusal, ``kind`` ("image" or "video") what it names."""
        head = url[:16].lower()
        if head.startswith("data:"):
            source_kind = "data"
        elif head.startswith(("http://", "https://")):
            source_kind = "remote"
        elif "://" in url[:16] and not head.startswith("file://"):
            source_kind = "other"  # open_image explains the unsupported scheme
        else:
            source_kind = "local"
        shown = url if len(url) <= 60 else url[:40] + "..." + url[-17:]
        if source_kind == "remote" and not self.allow_remote_media:
            raise RequestError(
                f"{kind} {shown!r}: remote {kind} URLs are disabled on this server; send the {kind} as a "
                "data: URL, or start the server with --allow-remote-media",
                where,
            )
        if source_kind == "local" and self.allowed_dir is None:
            raise RequestError(
                f"{kind} {shown!r}: local {kind} files are disabled on this server; send the {kind} as a "
                "data: URL, or start the server with --allowed-media-dir DIR",
                where,
            )

    def open_image(self, url: str, where: str) -> OpenedImage:
        """The image at ``url``, its header read, under the media policy and the limits."""
        self.check_policy(url, where)
        try:
            return open_image(
                url,
                allowed_dir=self.allowed_dir,
                allow_remote=self.allow_remote_media,
                max_pixels=self.limits.max_request_pixels,
                remote_timeout=self.limits.remote_timeout,
                max_remote_bytes=self.limits.remote_max_bytes,
            )
        except ImageLimitError as exc:
            raise RequestError(_with_flag(exc), where) from None
        except InputError as exc:
            raise RequestError(str(exc), where) from None

    def load_image(self, url: str, where: str) -> Any:
        """The decoded image at ``url`` (policy and limits as :meth:`open_image`)."""
        image = self.open_image(url, where)
        try:
            return image.decode()
        except InputError as exc:
            raise RequestError(str(exc), where) from None

    def close(self) -> None:
        """The server is stopping: requests waiting for pixels get a 503 now."""
        self.pixels.close()


def _image_budget(part: Any) -> dict[str, Any]:
    """An image_url part's budget for the preprocessor: OpenAI's ``detail`` and (an extension, as
    qwen-vl-utils names them) ``min_pixels`` / ``max_pixels`` and ``max_num_tiles`` inside ``image_url``."""
    image_url = part.image_url
    if not isinstance(image_url, ImageURL):
        return {}
    budget: dict[str, Any] = {"detail": image_url.detail} if image_url.detail is not None else {}
    for key in ("min_pixels", "max_pixels", "max_num_tiles"):
        value = (image_url.model_extra or {}).get(key)
        if value is not None:
            budget[key] = value
    return budget


def _with_flag(exc: ImageLimitError) -> str:
    """The limit's message, naming the server flag that sets it."""
    flag = LIMIT_FLAGS.get(exc.limit)
    return f"{exc} (this server's limit: {flag})" if flag else str(exc)
