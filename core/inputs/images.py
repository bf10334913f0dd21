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

:func:`image_content_key` hashes an image's pixels (for caches keyed by image content).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

#: Default limit on width * height: a decoded 64 MP RGBA image is 256 MB.
MAX_PIXELS = 64_000_000
#: Remote images (``allow_remote=True``) larger than this are refused while downloading.
MAX_REMOTE_BYTES = 32 * 1024 * 1024
#: Seconds to wait for a remote image server.
REMOTE_TIMEOUT_S = 10.0

_REENCODE = "re-save or re-download it"
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def load_image(
    source: Any,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Load and fully decode one image.

    :param source: a path (``str`` / ``Path``), ``file://``, ``data:image/...;base64,`` or
        ``http(s)://`` URL, ``bytes`` / ``bytearray``, or a ``PIL.Image.Image``.
    :param allowed_dir: if set, local files must resolve (after symlinks) inside this directory;
        a server sets it so that requests cannot read arbitrary files.
    :param allow_remote: fetch ``http(s)://`` URLs (refused by default: a server would otherwise
        fetch any URL a client names).
    :param max_pixels: refuse images with more pixels than this (decompression bombs).
    :return: the decoded image, in its own mode.
    :raises InputError: one line naming the image, the cause and the fix.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        name = f"<PIL.Image {source.mode} {source.width}x{source.height}>"
        _check_size(source.size, name, max_pixels)
        try:
            source.load()  # a lazily opened file may still be truncated
        except Exception as exc:
            raise _decode_error(name, exc) from None
        return source

    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), f"({len(source)} bytes)", max_pixels)
    if isinstance(source, Path):
        name = _quote(str(source))
        return _decode(_read_file(source, name, allowed_dir), name, max_pixels)
    if not isinstance(source, str):
        raise InputError(
            f"cannot load an image from a {type(source).__name__}; pass a file path, a file://, "
            "data: or http(s):// URL, bytes or a PIL image"
        )

    name = _quote(source)
    scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
    if scheme == "data":
        return _decode(_decode_data_url(source, name), name, max_pixels)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise InputError(
                f"image {name}: remote image URLs are disabled; download the image and send it as "
                "a file or a data: URL, or enable remote images (allow_remote)"
            )
        return _decode(_fetch(source, name), name, max_pixels)
    if scheme == "file":
        parsed = urllib.parse.urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"image {name}: file:// URLs must name a local file (file:///path/to/image.png)")
        path = urllib.request.url2pathname(parsed.path)
        return _decode(_read_file(Path(path), name, allowed_dir), name, max_pixels)
    if scheme and len(scheme) > 1 and scheme.isalpha() and source[len(scheme) :].startswith("://"):
        raise InputError(
            f"image {name}: unsupported URL scheme {scheme!r}; use a file path, file://, data: or http(s)://"
        )
    return _decode(_read_file(Path(source), name, allowed_dir), name, max_pixels)


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


def _read_file(path: Path, name: str, allowed_dir: str | Path | None) -> bytes:
    try:
        resolved = path.expanduser().resolve()
        if allowed_dir is not None:
            root = Path(allowed_dir).expanduser().resolve()
            if not resolved.is_relative_to(root):
                raise InputError(
                    f"image {name}: path is outside the allowed image directory {str(root)!r}; put "
                    "the file there or send the image as a data: URL"
                )
        if not resolved.exists():
            hint = ""
            if len(str(path)) > 64 and _BASE64.fullmatch(str(path)):
                hint = " (base64 data needs a data:image/<type>;base64, prefix)"
            raise InputError(f"image {name}: no such file; check the path{hint}")
        if resolved.is_dir():
            raise InputError(f"image {name}: is a directory, not an image file; name a file inside it")
        return resolved.read_bytes()
    except OSError as exc:  # unreadable, name too long, symlink loop, ...
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(f"image {name}: cannot read the file ({reason}); check the path and its permissions") from None
    except RuntimeError as exc:  # symlink loop on older Pythons
        raise InputError(f"image {name}: cannot resolve the path ({exc}); check the path") from None


def _decode_data_url(url: str, name: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise InputError(f"image {name}: not a base64 image data URL; use data:image/<type>;base64,<data>")
    payload = "".join(urllib.parse.unquote(payload).split())
    payload += "=" * (-len(payload) % 4)  # tolerate missing padding
    altchars = b"-_" if ("-" in payload or "_" in payload) else None  # URL-safe alphabet
    try:
        return base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image {name}: the data URL is not valid base64 ({exc}); re-encode the image") from None


def _fetch(url: str, name: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vlm"})
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            data = response.read(MAX_REMOTE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"image {name}: the server answered HTTP {exc.code} {exc.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"image {name}: could not fetch it ({reason}); check the URL and the network") from None
    if len(data) > MAX_REMOTE_BYTES:
        raise InputError(
            f"image {name}: larger than {MAX_REMOTE_BYTES // 2**20} MiB; download it, downscale it "
            "and send it as a file"
        )
    return data


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError(f"image {name}: is empty (0 bytes); {_REENCODE}")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (~89 MP); ours (max_pixels) is checked just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {name}: too many pixels ({exc}); downscale the image first") from None
    except UnidentifiedImageError:
        raise InputError(
            f"image {name}: not an image in a format Pillow can read; send a PNG, JPEG, WebP, GIF or BMP"
        ) from None
    except Exception as exc:
        raise _decode_error(name, exc) from None
    _check_size(image.size, name, max_pixels)
    try:
        image.load()
    except Exception as exc:
        raise _decode_error(name, exc) from None
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation, as transformers' load_image applies it
        image = ImageOps.exif_transpose(image)
    return image


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"image {name}: has zero size ({width}x{height}); send a non-empty image")
    if width * height > max_pixels:
        raise InputError(
            f"image {name}: {width}x{height} is {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,}; downscale it first"
        )


def _decode_error(name: str, exc: Exception) -> InputError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in message.lower():
        return InputError(f"image {name}: file is truncated ({message}); {_REENCODE}")
    return InputError(f"image {name}: the image data is corrupt ({type(exc).__name__}: {message}); {_REENCODE}")


__all__ = ["MAX_PIXELS", "MAX_REMOTE_BYTES", "REMOTE_TIMEOUT_S", "image_content_key", "load_image"]
