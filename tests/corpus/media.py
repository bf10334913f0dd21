"""The hostile pictures of the corpus, written at test time (a bomb or a pickle is not something
to keep in the repository): :func:`write_media` fills a directory with them and returns it.

- ``red.png``: a good picture (the control).
- ``empty.png`` (0 bytes), ``notes.png`` (text), ``truncated.png`` (half a PNG),
  ``corrupt.png`` (valid header, garbage pixel data), ``zero.gif`` (a 0x0 GIF header).
- ``bomb.png``: 40,000 x 40,000 one-bit pixels that compress to a few hundred KB.
- ``huge.png``: a PNG header claiming 100,000 x 100,000 pixels, nothing after it.
- ``drawing.svg``: vector graphics, not a raster format PIL reads.
- ``payload.png``: a pickle that would create ``PWNED`` if anything unpickled it.
- ``subdir/``: a directory; ``link-to-etc-passwd.png``: a symlink out of the media directory.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_media(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (220, 30, 30)).save(good, format="PNG")
    png = good.getvalue()
    (root / "red.png").write_bytes(png)
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("these are my notes, not a picture\n")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    garbage = zlib.compress(b"\x07" * 10) + b"garbage"
    (root / "corrupt.png").write_bytes(_png_header(64, 48) + _png_chunk(b"IDAT", garbage) + _png_chunk(b"IEND", b""))
    (root / "zero.gif").write_bytes(b"GIF89a\x00\x00\x00\x00\x00\x00\x00;")
    side = 40_000  # one-bit rows of zeros: each row is a filter byte and side / 8 zero bytes
    row = b"\x00" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    (root / "bomb.png").write_bytes(
        _png_header(side, side, bit_depth=1, color_type=0) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )
    (root / "huge.png").write_bytes(_png_header(100_000, 100_000))
    (root / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (root / "payload.png").write_bytes(pickle.dumps(_Payload(root / "PWNED")))
    (root / "subdir").mkdir(exist_ok=True)
    link = root / "link-to-etc-passwd.png"
    if not link.exists():
        link.symlink_to("/etc/passwd")
    return root
