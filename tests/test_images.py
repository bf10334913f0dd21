"""vlm.inputs.images.load_image: every input kind, every failure a one-line InputError naming the image;
and the message-part helpers of vlm.inputs."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.errors import InputError
from vlm.inputs import ImageInput, ModelInputs, iter_image_parts, normalize_messages
from vlm.inputs import images as images_module
from vlm.inputs.images import image_content_key, load_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression bomb for free."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def rgba() -> Image.Image:
    pixels = np.random.RandomState(0).randint(0, 256, (20, 30, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


def assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert message.startswith("image "), message
    for needle in needles:
        assert needle in message, message
    return message


# -- every kind of source ------------------------------------------------------------------


def test_sources_all_give_the_same_pixels(tmp_path, rgba):
    data = png_bytes(rgba)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")  # URL-safe, unpadded, wrapped
    wrapped = "data:image/png;base64," + "\n".join(urlsafe[i : i + 76] for i in range(0, len(urlsafe), 76))
    sources = [str(path), path, path.as_uri(), data, bytearray(data), data_url, wrapped, rgba]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGBA", type(source)  # the mode is the preprocessor's business
        assert np.array_equal(np.asarray(image), np.asarray(rgba)), type(source)


def test_modes_are_kept(tmp_path):
    for mode in ("L", "P", "LA", "I;16", "CMYK"):
        image = Image.new(mode, (5, 4))
        if mode == "CMYK":
            assert load_image(jpeg_bytes(image)).mode == "CMYK"
        else:
            assert load_image(png_bytes(image)).mode == mode


def test_exif_orientation_is_applied_like_transformers(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    pixels = np.random.RandomState(1).randint(0, 256, (10, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(Image.fromarray(pixels), exif=exif.tobytes(), quality=95))
    ours = load_image(str(path))
    assert ours.size == (10, 16)
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(hf_load_image(str(path))))


def test_lazily_opened_pil_image_is_decoded(tmp_path, rgba):
    path = tmp_path / "lazy.png"
    path.write_bytes(png_bytes(rgba))
    image = load_image(Image.open(path))
    assert np.array_equal(np.asarray(image), np.asarray(rgba))


def test_allowed_dir(tmp_path, rgba):
    inside = tmp_path / "images"
    inside.mkdir()
    (inside / "ok.png").write_bytes(png_bytes(rgba))
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(rgba))
    (inside / "link.png").symlink_to(secret)

    assert load_image(str(inside / "ok.png"), allowed_dir=inside).size == (30, 20)
    assert load_image((inside / "ok.png").as_uri(), allowed_dir=str(inside)).size == (30, 20)
    for source in (str(secret), str(inside / ".." / "secret.png"), str(inside / "link.png"), secret.as_uri()):
        with pytest.raises(InputError) as exc:
            load_image(source, allowed_dir=inside)
        assert_one_line(exc, "outside the allowed image directory", str(inside))
    # bytes and data URLs are not files: allowed_dir does not restrict them
    assert load_image(png_bytes(rgba), allowed_dir=inside).size == (30, 20)


def test_remote_urls_are_refused_by_default():
    for url in ("http://example.com/cat.png", "https://example.com/cat.png"):
        with pytest.raises(InputError) as exc:
            load_image(url)
        assert_one_line(exc, url, "remote image URLs are disabled", "allow_remote")


@pytest.fixture
def http_server(rgba):
    payload = png_bytes(rgba)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_error(404, "Not Found")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_urls_when_allowed(http_server, rgba, monkeypatch):
    image = load_image(f"{http_server}/cat.png", allow_remote=True)
    assert np.array_equal(np.asarray(image), np.asarray(rgba))
    with pytest.raises(InputError) as exc:
        load_image(f"{http_server}/missing.png", allow_remote=True)
    assert_one_line(exc, "HTTP 404", "check the URL")
    monkeypatch.setattr(images_module, "MAX_REMOTE_BYTES", 100)
    with pytest.raises(InputError) as exc:
        load_image(f"{http_server}/cat.png", allow_remote=True)
    assert_one_line(exc, "larger than")


# -- failures ------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError) as exc:
        load_image(str(tmp_path / "cat.jpg"))
    assert_one_line(exc, "cat.jpg", "no such file")
    with pytest.raises(InputError) as exc:
        load_image(tmp_path)
    assert_one_line(exc, "is a directory")
    with pytest.raises(InputError) as exc:
        load_image("iVBORw0KGgo" * 10)  # base64 without its data: prefix
    assert_one_line(exc, "no such file", "data:image/")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        load_image(str(path))
    assert_one_line(exc, "'", "empty.png", "is empty (0 bytes)", "re-save or re-download")


def test_truncated_files(tmp_path):
    pixels = np.random.RandomState(2).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, data in (
        ("cat.jpg", jpeg_bytes(Image.fromarray(pixels))),
        ("cat.png", png_bytes(Image.fromarray(pixels))),
    ):
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError) as exc:
            load_image(str(path))
        message = assert_one_line(exc, name, "re-save or re-download")
        assert "truncated" in message or "corrupt" in message


def test_corrupt_data(rgba):
    with pytest.raises(InputError) as exc:
        load_image(b"this is not an image at all")
    assert_one_line(exc, "(27 bytes)", "not an image")
    data = bytearray(png_bytes(rgba))
    data[60:120] = bytes(60)  # damage the compressed pixel data, keep the header
    with pytest.raises(InputError) as exc:
        load_image(bytes(data))
    assert_one_line(exc, "re-save or re-download")


def test_zero_size_image():
    with pytest.raises(InputError) as exc:
        load_image(Image.new("RGB", (0, 5)))
    assert_one_line(exc, "zero size (0x5)")


def test_decompression_bombs():
    # beyond twice PIL's own limit: PIL refuses while reading the header
    with pytest.raises(InputError) as exc:
        load_image(png_header_only(100_000, 100_000))
    assert_one_line(exc, "too many pixels", "downscale")
    # between PIL's limits (PIL would only warn) and above ours
    with pytest.raises(InputError) as exc:
        load_image(png_header_only(10_000, 10_000))
    assert_one_line(exc, "100,000,000 pixels", "64,000,000", "downscale")
    # a real, small file that decodes to a big image, with a lower limit
    big = png_bytes(Image.new("1", (3000, 3000)))
    assert len(big) < 10_000
    with pytest.raises(InputError) as exc:
        load_image(big, max_pixels=1_000_000)
    assert_one_line(exc, "3000x3000", "1,000,000")
    with pytest.raises(InputError):
        load_image(Image.new("1", (3000, 3000)), max_pixels=1_000_000)


def test_bad_urls_and_types():
    cases = [
        ("data:text/plain;base64,aGVsbG8=", "data:image/<type>;base64"),
        ("data:image/png,rawdata", "data:image/<type>;base64"),
        ("data:image/png;base64,!!!!", "not valid base64"),
        ("ftp://example.com/cat.png", "unsupported URL scheme 'ftp'"),
        ("file://otherhost/cat.png", "local file"),
    ]
    for source, needle in cases:
        with pytest.raises(InputError) as exc:
            load_image(source)
        assert_one_line(exc, needle)
    with pytest.raises(InputError) as exc:
        load_image(42)
    assert "\n" not in str(exc.value) and "int" in str(exc.value)


def test_image_content_key(rgba):
    key = image_content_key(rgba)
    assert key == image_content_key(rgba.copy())
    assert key != image_content_key(rgba.convert("RGB"))
    assert key != image_content_key(rgba.crop((0, 0, 30, 19)))
    palette = Image.new("P", (4, 4))
    other = palette.copy()
    other.putpalette([255, 0, 0] * 256)
    assert image_content_key(palette) != image_content_key(other)


# -- message parts -------------------------------------------------------------------------


def test_normalize_messages_and_iter_image_parts():
    pil = Image.new("RGB", (2, 2))
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image", "image": pil},
                {"type": "image", "url": "https://x/y.png"},
                {"type": "image", "path": "/tmp/z.png"},
                {"type": "image", "base64": base64.b64encode(b"raw").decode()},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": "file:///tmp/w.png"},
            ],
        },
    ]
    normalized = normalize_messages(messages)
    assert normalized[0] == messages[0]
    assert all(p["type"] in ("text", "image") for p in normalized[1]["content"])
    expected = [pil, "https://x/y.png", "/tmp/z.png", b"raw", "data:image/png;base64,AAAA", "file:///tmp/w.png"]
    assert list(iter_image_parts(normalized)) == expected
    assert list(iter_image_parts(messages)) == expected
    assert messages[1]["content"][5]["type"] == "image_url"  # the input is not modified


@pytest.mark.parametrize(
    "part, needle",
    [
        ({"type": "audio", "audio": "x.wav"}, "type 'audio'"),
        ({"type": "image"}, "exactly one of"),
        ({"type": "image", "url": "a", "path": "b"}, "exactly one of"),
        ({"type": "image_url", "image_url": {}}, "image_url"),
        ({"type": "text"}, "text part"),
        ({"text": "no type"}, "'type'"),
    ],
)
def test_bad_parts(part, needle):
    with pytest.raises(InputError) as exc:
        normalize_messages([{"role": "user", "content": [part]}])
    assert "\n" not in str(exc.value) and "message 0 part 0" in str(exc.value) and needle in str(exc.value)


def test_model_inputs_fields():
    inputs = ModelInputs(token_ids=[1, 2])
    assert inputs.image_token_id is None and inputs.images == []
    image = ImageInput(pixel_values=None, num_tokens=4, key="k")
    assert image.extra == {}


def test_inputs_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, vlm.inputs, vlm.inputs.images; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_file_path_with_tilde(tmp_path, rgba, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "home.png").write_bytes(png_bytes(rgba))
    assert load_image("~/home.png").size == (30, 20)
    assert isinstance(Path("~/home.png"), Path)
