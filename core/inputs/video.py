"""Load videos from whatever a user passes, with one-line errors that name the video and the fix.

A chat message's video part (:mod:`vlm.inputs.messages`) holds either a video file or a list of
frames (as qwen-vl-utils takes them). :func:`open_video` opens the first kind:

- a file path (``str`` or ``Path``) or a ``file://`` URL;
- raw ``bytes`` or a ``data:video/...;base64,...`` URL;
- an ``http(s)://`` URL, only with ``allow_remote=True`` (the rule for remote images), downloaded
  within ``remote_timeout`` seconds and ``max_remote_bytes`` bytes.

It reads the container's header with PyAV (``pip install av``; a list of frames needs no
decoder) and returns an :class:`OpenedVideo` whose frame count, frame rate and size are known
before any frame is decoded, so a caller picks the frames it wants (a family's sampling rule:
``fps``, frame budgets) and refuses a video over its budget for free; :meth:`OpenedVideo.frames`
then decodes just those, the way transformers' ``read_video_pyav`` does (every frame decoded in
order up to the last one asked for, the asked ones converted to RGB).

:func:`load_frames` loads a list of frames, each as an image (:func:`vlm.inputs.images.load_image`).

Nothing here imports torch; PyAV and numpy are imported when a video file is opened.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from vlm.errors import InputError
from vlm.inputs.images import MAX_PIXELS, ImageLimitError, load_image, read_media_source

NO_DECODER = (
    "decoding video files needs PyAV, which is not installed (pip install av); or send the video as a "
    "list of frames ({'type': 'video', 'video': [frame, ...]})"
)


@dataclass
class OpenedVideo:
    """A video whose header was read: frame count, frame rate and size known, no frame decoded.

    Close it (or use it as a context manager) when done: it holds the open container.
    """

    name: str  #: how messages name the video (its path or URL, shortened)
    total_frames: int  #: frames in the video
    fps: float  #: its frame rate (the stream's average rate)
    width: int
    height: int
    container: Any = field(repr=False, default=None)

    @property
    def duration(self) -> float:
        """Seconds: frames / rate, as transformers' ``VideoMetadata`` has it."""
        return self.total_frames / self.fps

    def frames(self, indices: Sequence[int]) -> Any:
        """The frames at ``indices`` (ascending, in ``[0, total_frames)``) as a uint8 ``[N, H, W, 3]``
        RGB array: frames are decoded in order up to the last index, as transformers' PyAV reader does."""
        import numpy as np

        wanted = sorted(set(int(i) for i in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.total_frames:
            raise InputError(
                f"video {self.name}: frames {wanted[:1]}..{wanted[-1:]} asked for, but it has {self.total_frames}; "
                "the sampling rule must stay inside the video"
            )
        chosen = set(wanted)
        frames = []
        index = -1
        try:
            self.container.seek(0)
            for index, frame in enumerate(self.container.decode(video=0)):
                if index > wanted[-1]:
                    break
                if index in chosen:
                    frames.append(frame.to_ndarray(format="rgb24"))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            raise _undecodable(self.name, exc) from None
        if len(frames) != len(wanted):
            raise InputError(
                f"video {self.name}: its header says {self.total_frames} frames but only {index + 1} decode; "
                "re-encode it (e.g. ffmpeg -i in.mp4 out.mp4)"
            )
        # asked-for indices may repeat (a short video sampled densely): repeat their frames
        by_index = dict(zip(wanted, frames))
        return np.stack([by_index[int(i)] for i in indices])

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self) -> OpenedVideo:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_video(
    source: Any,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    max_pixels: int | None = None,
    remote_timeout: float | None = None,
    max_remote_bytes: int | None = None,
) -> OpenedVideo:
    """Open one video file and read its header.

    :param source: a path (``str`` / ``Path``), ``file://``, ``data:video/...;base64,`` or
        ``http(s)://`` URL, or ``bytes``.
    :param allowed_dir: if set, local files must resolve (after symlinks) inside this directory.
    :param allow_remote: fetch ``http(s)://`` URLs (refused by default, as remote images are).
    :param max_pixels: refuse videos whose frames have more pixels than this; default
        :data:`vlm.inputs.images.MAX_PIXELS`.
    :param remote_timeout, max_remote_bytes: limits on a remote video's download; defaults those of
        remote images.
    :raises InputError: one line naming the video, the cause and the fix.
    """
    data, name = _read_source(source, allowed_dir, allow_remote, remote_timeout, max_remote_bytes)
    try:
        import av
    except ImportError:
        raise InputError(f"video {name}: {NO_DECODER}") from None
    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data))
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds for a file it cannot read
        raise _undecodable(name, exc) from None
    try:
        if not container.streams.video:
            raise InputError(f"video {name}: the file holds no video stream; send a video file or a list of frames")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or Fraction(rate) <= 0:
            raise InputError(
                f"video {name}: its frame rate is unknown, so frames cannot be sampled by time; re-encode it "
                "with a constant frame rate (ffmpeg -i in.mp4 -r 25 out.mp4)"
            )
        width, height = int(stream.width or 0), int(stream.height or 0)
        limit = MAX_PIXELS if max_pixels is None else max_pixels
        if width <= 0 or height <= 0:
            raise InputError(f"video {name}: its frames have zero size ({width}x{height}); re-encode it")
        if width * height > limit:
            raise ImageLimitError(
                f"video {name}: frames of {width}x{height} are {width * height:,} pixels, more than the limit of "
                f"{limit:,}; downscale it first",
                "pixels",
            )
        total = int(stream.frames or 0) or _count_frames(container, name)
        if total <= 0:
            raise InputError(f"video {name}: it holds no frames; send a video with at least one frame")
        return OpenedVideo(name, total, float(Fraction(rate)), width, height, container)
    except BaseException:
        container.close()
        raise


def read_video_source(
    source: Any,
    *,
    allowed_dir: str | Path | None = None,
    allow_remote: bool = False,
    remote_timeout: float | None = None,
    max_remote_bytes: int | None = None,
) -> bytes | Path:
    """What :func:`open_video` opens for ``source``, read under a media policy (the parameters are
    its own): the bytes of a ``data:`` URL or a download, or a local file's resolved path. A server
    reads a request's video with its own policy and hands the result to the preprocessor."""
    return _read_source(source, allowed_dir, allow_remote, remote_timeout, max_remote_bytes)[0]


def load_frames(frames: Any, where: str = "video") -> list[Any]:
    """A video given as frames: each a path, URL, bytes or PIL image (:func:`load_image`'s sources),
    loaded as an image (remote frames are refused: the server loads those under its own policy)."""
    if isinstance(frames, (str, bytes, Path)) or not isinstance(frames, Sequence) or not frames:
        raise InputError(f"{where}: a video given as frames needs a non-empty list of images")
    return [load_image(frame) for frame in frames]


def is_frame_list(source: Any) -> bool:
    """Whether a video part's source is a list of frames rather than one video file."""
    return isinstance(source, (list, tuple))


# ----------------------------------------------------------------------------- internals


def _read_source(
    source: Any,
    allowed_dir: str | Path | None,
    allow_remote: bool,
    remote_timeout: float | None,
    max_remote_bytes: int | None,
) -> tuple[bytes | Path, str]:
    """The video's bytes, or the local path to open (a file is opened, not read whole), and its
    name for messages: the same sources and policy as images (:func:`read_media_source`)."""
    data, name = read_media_source(
        source,
        "video",
        allowed_dir=allowed_dir,
        allow_remote=allow_remote,
        remote_timeout=remote_timeout,
        max_remote_bytes=max_remote_bytes,
        read_local=False,
    )
    if isinstance(data, bytes) and not data:
        raise InputError(f"video {name}: is empty (0 bytes); send a video file")
    return data, name


def _count_frames(container: Any, name: str) -> int:
    """Frames of a stream whose header does not count them: decode it once."""
    try:
        count = sum(1 for _ in container.decode(video=0))
        container.seek(0)
    except Exception as exc:  # noqa: BLE001
        raise _undecodable(name, exc) from None
    return count


def _undecodable(name: str, exc: Exception) -> InputError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return InputError(
        f"video {name}: not a video PyAV can decode ({type(exc).__name__}: {message[:120]}); re-encode it "
        "(e.g. ffmpeg -i in.mov out.mp4) or send a list of frames"
    )


__all__ = ["NO_DECODER", "OpenedVideo", "is_frame_list", "load_frames", "open_video", "read_video_source"]
