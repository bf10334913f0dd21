"""Load images from whatever a user passes, with one-line errors that name the image and the fix.

:func:`load_image` accepts a file path (``str`` or ``Path``), a ``file://`` URL, raw ``bytes``, a
``data:image/...;base64,...`` URL, a ``PIL.Image.Image``, and (only with ``allow_remote=True``) an
``http(s)://`` URL. It decodes the image completely, so a truncated or corrupt file fails here,
with a message such as::

    image 'cat.jpg': file is truncated (image file is truncated (3 bytes not processed)); re-save or re-download it

and never later inside a model. The image keeps its mode (RGBA, L, P, ...): converting to RGB is
the preprocessor's job, because models differ in how they do it (transformers composites
transparency onto white). Like ``transformers.image_utils.load_image``, encoded images (paths,
URLs, bytes) are turned upright according to their EXIF orientation; a PIL image is used as is.

Limits, each a one-line :class:`ImageLimitError` (an :class:`~vlm.errors.InputError` whose
``limit`` says which one was hit, so that a server can name the setting that raises it):

- ``max_pixels`` (default :data:`MAX_PIXELS`): width x height, read from the file's header before
  anything is decoded (decompression bombs: a small PNG may decode to gigabytes);
- ``remote_timeout`` (default :data:`REMOTE_TIMEOUT_S`): the whole download of a remote image,
  connecting included, not each read (a server sending a byte at a time cannot hold it longer);
- ``max_remote_bytes`` (default :data:`MAX_REMOTE_BYTES`): the size of a remote image.

:func:`open_image` does everything but decoding the pixels: it returns an :class:`OpenedImage`
whose size is known, so a caller can refuse or schedule a batch of images by their pixel count
(:func:`check_pixel_budget`) before paying for any of them; :meth:`OpenedImage.decode` finishes.
``load_image(...)`` is ``open_image(...).decode()``.

:func:`image_content_key` hashes an image's pixels (for caches keyed by image content);
:func:`is_remote_url` tells a remote image from a local one, for callers (the CLI, the server)
that refuse remote media unless a flag allows it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import http.client
import io
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

#: Default limit on width * height: a decoded 64 MP RGBA image is 256 MB.
MAX_PIXELS = 64_000_000
#: Remote images (``allow_remote=True``) larger than this are refused while downloading.
MAX_REMOTE_BYTES = 32 * 1024 * 1024
#: Seconds a remote image's whole download may take (connecting, headers and body together).
REMOTE_TIMEOUT_S = 10.0


class ImageLimitError(InputError):
    """An image over one of the limits; ``limit`` names it: ``"pixels"`` (one image),
    ``"request_pixels"`` (:func:`check_pixel_budget`), ``"remote_bytes"`` or ``"remote_timeout"``."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


_REENCODE = "re-save or re-download it"
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def load_image(
    source: Any,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    max_pixels: int | None = None,
    remote_timeout: float | None = None,
    max_remote_bytes: int | None = None,
) -> Image.Image:
    """Load and fully decode one image.

    :param source: a path (``str`` / ``Path``), ``file://``, ``data:image/...;base64,`` or
        ``http(s)://`` URL, ``bytes`` / ``bytearray``, or a ``PIL.Image.Image``.
    :param allowed_dir: if set, local files must resolve (after symlinks) inside this directory;
        a server sets it so that requests cannot read arbitrary files.
    :param allow_remote: fetch ``http(s)://`` URLs (refused by default: a server would otherwise
        fetch any URL a client names).
    :param max_pixels: refuse images with more pixels than this (decompression bombs), checked
        before decoding; default :data:`MAX_PIXELS`.
    :param remote_timeout: seconds the whole download of a remote image may take; default
        :data:`REMOTE_TIMEOUT_S`.
    :param max_remote_bytes: refuse remote images larger than this; default :data:`MAX_REMOTE_BYTES`.
    :return: the decoded image, in its own mode.
    :raises InputError: one line naming the image, the cause and the fix (an
        :class:`ImageLimitError` for a limit).
    """
    return open_image(
        source,
        allowed_dir=allowed_dir,
        allow_remote=allow_remote,
        max_pixels=max_pixels,
        remote_timeout=remote_timeout,
        max_remote_bytes=max_remote_bytes,
    ).decode()


@dataclass
class OpenedImage:
    """An image whose header was read (its size is known) but whose pixels are not decoded yet."""

    name: str  #: how messages name the image (its path or URL, shortened)
    image: Image.Image | None  #: opened lazily; ``None`` once closed
    encoded: bool = True  #: read from encoded bytes (False: a PIL image the caller passed, used as is)

    @property
    def size(self) -> tuple[int, int]:
        return self._image().size

    @property
    def pixels(self) -> int:
        width, height = self.size
        return width * height

    def decode(self) -> Image.Image:
        """Decode the pixels (an encoded image is turned upright by its EXIF orientation)."""
        from PIL import ImageOps

        image = self._image()
        try:
            image.load()  # a truncated file fails here
        except Exception as exc:
            raise _decode_error(self.name, exc) from None
        if self.encoded and image.getexif().get(0x0112, 1) != 1:
            image = ImageOps.exif_transpose(image)  # as transformers' load_image does
        return image

    def close(self) -> None:
        """Drop the image (its decoded pixels go once nobody else holds them)."""
        self.image = None

    def _image(self) -> Image.Image:
        if self.image is None:
            raise ValueError(f"image {self.name} was closed")
        return self.image


def open_image(
    source: Any,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    max_pixels: int | None = None,
    remote_timeout: float | None = None,
    max_remote_bytes: int | None = None,
) -> OpenedImage:
    """Read (or download) one image and its header, not its pixels; the parameters are
    :func:`load_image`'s. The size limit ``max_pixels`` is checked here, so a decompression
    bomb costs no memory."""
    from PIL import Image

    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        name = f"<PIL.Image {source.mode} {source.width}x{source.height}>"
        _check_size(source.size, name, max_pixels)
        return OpenedImage(name, source, encoded=False)

    data, name = read_media_source(
        source,
        "image",
        allowed_dir=allowed_dir,
        allow_remote=allow_remote,
        remote_timeout=remote_timeout,
        max_remote_bytes=max_remote_bytes,
    )
    assert isinstance(data, bytes)  # read_local: a local file's bytes
    return _open(data, name, max_pixels)


def read_media_source(
    source: Any,
    kind: str,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    remote_timeout: float | None = None,
    max_remote_bytes: int | None = None,
    read_local: bool = True,
) -> tuple[bytes | Path, str]:
    """One media source under a policy, for images and videos alike: the bytes of ``bytes``, a
    ``data:<kind>/...;base64,`` URL or an ``http(s)://`` download (only with ``allow_remote``,
    within ``remote_timeout`` and ``max_remote_bytes``), or a local file (a path or ``file://``
    URL, inside ``allowed_dir`` when set): its bytes, or with ``read_local=False`` its resolved
    path (a video is opened, not read whole). Also the source's name for messages.

    :param kind: ``"image"`` or ``"video"``: the word every one-line error starts with.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), f"({len(source)} bytes)"
    if isinstance(source, Path):
        name = _quote(str(source))
        return _local_file(source, name, kind, allowed_dir, read_local), name
    if not isinstance(source, str):
        raise InputError(
            f"cannot load {'an' if kind == 'image' else 'a'} {kind} from a {type(source).__name__}; pass a file "
            f"path, a file://, data: or http(s):// URL, bytes or "
            + ("a PIL image" if kind == "image" else "a list of frames")
        )

    name = _quote(source)
    scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
    if scheme == "data":
        return _decode_data_url(source, name, kind), name
    if is_remote_url(source):
        if not allow_remote:
            raise InputError(
                f"{kind} {name}: remote {kind} URLs are disabled; download the {kind} and send it as "
                f"a file or a data: URL, or enable remote {kind}s (allow_remote)"
            )
        timeout = REMOTE_TIMEOUT_S if remote_timeout is None else remote_timeout
        limit = MAX_REMOTE_BYTES if max_remote_bytes is None else max_remote_bytes
        return _fetch(source, name, timeout, limit, kind), name
    if scheme == "file":
        parsed = urllib.parse.urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            example = "image.png" if kind == "image" else "clip.mp4"
            raise InputError(f"{kind} {name}: file:// URLs must name a local file (file:///path/to/{example})")
        path = urllib.request.url2pathname(parsed.path)
        return _local_file(Path(path), name, kind, allowed_dir, read_local), name
    if scheme and len(scheme) > 1 and scheme.isalpha() and source[len(scheme) :].startswith("://"):
        raise InputError(
            f"{kind} {name}: unsupported URL scheme {scheme!r}; use a file path, file://, data: or http(s)://"
        )
    return _local_file(Path(source), name, kind, allowed_dir, read_local), name


def is_remote_url(source: Any) -> bool:
    """Whether ``source`` names a remote image (an ``http:`` or ``https:`` URL), which is fetched
    only when the caller allows remote media."""
    return isinstance(source, str) and ":" in source[:12] and source.split(":", 1)[0].lower() in ("http", "https")


def check_pixel_budget(images: Sequence[OpenedImage], max_pixels: int) -> int:
    """The total pixel count of ``images``; an :class:`ImageLimitError` (``"request_pixels"``) when
    it is above ``max_pixels``. Only headers are read: call it before decoding any of them."""
    total = sum(image.pixels for image in images)
    if total > max_pixels:
        sizes = " + ".join(f"{w}x{h}" for w, h in (image.size for image in images[:6]))
        if len(images) > 6:
            sizes += f" + {len(images) - 6} more"
        raise ImageLimitError(
            f"the {len(images)} images of this request have {total:,} pixels in all ({sizes}), more than "
            f"the limit of {max_pixels:,} per request; send fewer or smaller images",
            "request_pixels",
        )
    return total


def image_content_key(image: Image.Image) -> str:
    """A sha256 hex digest of the image's mode, size, palette and pixel bytes."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
        digest.update(repr(image.info.get("transparency")).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _quote(text: str, limit: int = 60) -> str:
    if len(text) > limit:
        text = text[: limit - 20] + "..." + text[-17:]
    return repr(text)


def _local_file(path: Path, name: str, kind: str, allowed_dir: str | Path | None, read: bool) -> bytes | Path:
    """A local file inside ``allowed_dir`` (when set): its bytes, or (``read=False``) its resolved path."""
    try:
        resolved = path.expanduser().resolve()
        if allowed_dir is not None:
            root = Path(allowed_dir).expanduser().resolve()
            if not resolved.is_relative_to(root):
                raise InputError(
                    f"{kind} {name}: path is outside the allowed {kind} directory {str(root)!r}; put "
                    f"the file there or send the {kind} as a data: URL"
                )
        if not resolved.exists():
            hint = ""
            if len(str(path)) > 64 and _BASE64.fullmatch(str(path)):
                hint = f" (base64 data needs a data:{kind}/<type>;base64, prefix)"
            raise InputError(f"{kind} {name}: no such file; check the path{hint}")
        if resolved.is_dir():
            raise InputError(
                f"{kind} {name}: is a directory, not {'an' if kind == 'image' else 'a'} {kind} file; name a file inside it"
            )
        return resolved.read_bytes() if read else resolved
    except OSError as exc:  # unreadable, name too long, symlink loop, ...
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(
            f"{kind} {name}: cannot read the file ({reason}); check the path and its permissions"
        ) from None
    except RuntimeError as exc:  # symlink loop on older Pythons
        raise InputError(f"{kind} {name}: cannot resolve the path ({exc}); check the path") from None


def _decode_data_url(url: str, name: str, kind: str = "image") -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith(f"data:{kind}/") or not header.lower().endswith(";base64"):
        raise InputError(f"{kind} {name}: not a base64 {kind} data URL; use data:{kind}/<type>;base64,<data>")
    payload = "".join(urllib.parse.unquote(payload).split())
    payload += "=" * (-len(payload) % 4)  # tolerate missing padding
    altchars = b"-_" if ("-" in payload or "_" in payload) else None  # URL-safe alphabet
    try:
        return base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{kind} {name}: the data URL is not valid base64 ({exc}); re-encode the {kind}") from None


def _fetch(url: str, name: str, timeout: float, max_bytes: int, kind: str = "image") -> bytes:
    """The body at ``url``: at most ``max_bytes``, all of it within ``timeout`` seconds."""
    timed_out = ImageLimitError(
        f"{kind} {name}: the download took longer than {timeout:g} s; download the {kind} and send it as a "
        "data: URL, or host it on a faster server",
        "remote_timeout",
    )
    too_large = ImageLimitError(
        f"{kind} {name}: larger than {_bytes_text(max_bytes)}; download it, downscale it and send it as a file "
        "or a data: URL",
        "remote_bytes",
    )
    request = urllib.request.Request(url, headers={"User-Agent": "vlm"})
    chunks: list[bytes] = []
    with _Deadline(timeout) as deadline:
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=deadline.remaining()) as response:
                length = (response.headers.get("Content-Length") or "").strip()
                if length.isdigit() and int(length) > max_bytes:
                    raise too_large
                size = 0
                while not deadline.over():
                    chunk = response.read1(64 * 1024)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    chunks.append(chunk)
        except ImageLimitError:
            raise
        except urllib.error.HTTPError as exc:
            if deadline.over():
                raise timed_out from None
            raise InputError(
                f"{kind} {name}: the server answered HTTP {exc.code} {exc.reason}; check the URL"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            if deadline.over():
                raise timed_out from None
            reason = getattr(exc, "reason", None) or exc or type(exc).__name__
            raise InputError(f"{kind} {name}: could not fetch it ({reason}); check the URL and the network") from None
        if deadline.over():  # the watchdog cut the connection: what came is not the whole file
            raise timed_out
    return b"".join(chunks)


def _bytes_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size:,} bytes"


class _Deadline:
    """A download's deadline: connections opened under it get at most the time left, and a
    watchdog shuts their sockets down when it passes, which ends any read blocked on them
    (a socket timeout alone bounds each read, not the download)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.001)

    def over(self) -> bool:
        return self.expired or time.monotonic() >= self.end

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched_connection(base: type[http.client.HTTPConnection]) -> Any:
    """``base`` whose sockets connect within, and are watched by, a :class:`_Deadline`."""

    class Watched(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
            super().__init__(*args, **kwargs)

            def create_connection(address: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
                if deadline.over():
                    raise TimeoutError("the deadline passed")
                sock = socket.create_connection(address, deadline.remaining(), source_address)
                deadline.watch(sock)
                return sock

            self._create_connection = create_connection

    return Watched


_WatchedHTTPConnection = _watched_connection(http.client.HTTPConnection)
_WatchedHTTPSConnection = _watched_connection(http.client.HTTPSConnection)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        connection = functools.partial(_WatchedHTTPSConnection, deadline=self.deadline)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


def _open(data: bytes, name: str, max_pixels: int) -> OpenedImage:
    """Read ``data``'s header (format and size), not its pixels."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(f"image {name}: is empty (0 bytes); {_REENCODE}")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (~89 MP); ours (max_pixels) is checked just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLimitError(f"image {name}: too many pixels ({exc}); downscale the image first", "pixels") from None
    except UnidentifiedImageError:
        raise InputError(
            f"image {name}: not an image in a format Pillow can read; send a PNG, JPEG, WebP, GIF or BMP"
        ) from None
    except Exception as exc:
        raise _decode_error(name, exc) from None
    _check_size(image.size, name, max_pixels)
    return OpenedImage(name, image)


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"image {name}: has zero size ({width}x{height}); send a non-empty image")
    if width * height > max_pixels:
        raise ImageLimitError(
            f"image {name}: {width}x{height} is {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,}; downscale it first",
            "pixels",
        )


def _decode_error(name: str, exc: Exception) -> InputError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in message.lower():
        return InputError(f"image {name}: file is truncated ({message}); {_REENCODE}")
    return InputError(f"image {name}: the image data is corrupt ({type(exc).__name__}: {message}); {_REENCODE}")


__all__ = [
    "MAX_PIXELS",
    "MAX_REMOTE_BYTES",
    "REMOTE_TIMEOUT_S",
    "ImageLimitError",
    "OpenedImage",
    "check_pixel_budget",
    "image_content_key",
    "is_remote_url",
    "load_image",
    "open_image",
]
