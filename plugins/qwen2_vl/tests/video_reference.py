"""transformers' Qwen2-VL / Qwen2.5-VL *video* processor, run without torchvision (test helper).

transformers' ``Qwen2VLVideoProcessor`` (and every video processor) is built on its torchvision
backend, and torchvision is not installed here (no wheel matches this torch). Of torchvision it
calls three tensor kernels on this path: ``resize`` (bicubic, antialiased, on uint8 frames),
``normalize`` and ``grayscale_to_rgb``. :func:`write_torchvision_stand_in` writes a package named
``torchvision`` that implements those three the way torchvision 0.2x's ``resize_image`` /
``normalize_image`` do (on CPU, a uint8 bicubic resize is torch's native uint8 ``interpolate``
with ``antialias=True``; a same-size resize returns its input), plus the names transformers
imports. Everything else, frame sampling, the pixel budget, rescale-and-normalize, patchify,
placeholder expansion and ``second_per_grid_ts``, is transformers' own code.

Importing a fake ``torchvision`` would change what transformers picks elsewhere in a process (its
"fast" image processors), so the processor runs in a subprocess: :func:`reference_video_inputs`
pickles the request, runs this file as a script and reads the result back.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

STAND_IN_VERSION = "0.28.0"

_FUNCTIONAL = '''
"""torchvision.transforms.v2.functional: the kernels transformers' video processors call."""
import torch
from torch.nn.functional import interpolate

from torchvision.transforms import InterpolationMode


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    # torchvision's resize_image for tensors (CPU), for the modes transformers uses
    if max_size is not None:
        raise NotImplementedError("max_size")
    align_corners = None
    if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        align_corners = False
    else:
        antialias = False
    shape = image.shape
    channels, old_height, old_width = shape[-3:]
    new_height, new_width = size
    if (new_height, new_width) == (old_height, old_width):
        return image
    dtype = image.dtype
    acceptable = [torch.float32, torch.float64]
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        acceptable.append(torch.uint8)
    elif interpolation == InterpolationMode.BICUBIC or (
        interpolation == InterpolationMode.BILINEAR and "AVX2" in torch.backends.cpu.get_cpu_capability()
    ):
        acceptable.append(torch.uint8)
    image = image.reshape(-1, channels, old_height, old_width)
    need_cast = dtype not in acceptable
    if need_cast:
        image = image.to(torch.float32)
    image = interpolate(
        image, size=[new_height, new_width], mode=interpolation.value, align_corners=align_corners, antialias=antialias
    )
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            image = image.round_()
        image = image.to(dtype)
    return image.reshape(shape[:-3] + (channels, new_height, new_width))


def normalize(image, mean, std, inplace=False):
    # torchvision's normalize_image
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def grayscale_to_rgb(image):
    if image.shape[-3] >= 3:
        return image
    return image.repeat(*[1] * (image.ndim - 3), 3, 1, 1)


def _unavailable(*args, **kwargs):
    raise NotImplementedError("not part of the torchvision stand-in used by vlm's tests")


pad = crop = to_dtype = center_crop = pil_to_tensor = _unavailable
'''

_TRANSFORMS = """
import enum

from torchvision.transforms import functional


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"
"""

_TRANSFORMS_FUNCTIONAL = """
def pil_to_tensor(*args, **kwargs):
    raise NotImplementedError("not part of the torchvision stand-in used by vlm's tests")
"""

_IO = """
class ImageReadMode:
    UNCHANGED = 0
    RGB = 3


def decode_image(*args, **kwargs):
    raise NotImplementedError("not part of the torchvision stand-in used by vlm's tests")
"""


def write_torchvision_stand_in(root: Path) -> Path:
    """Write the ``torchvision`` stand-in (with a dist-info, so transformers sees it installed) under ``root``."""
    files = {
        "torchvision/__init__.py": f"__version__ = {STAND_IN_VERSION!r}\n",
        "torchvision/io.py": _IO,
        "torchvision/transforms/__init__.py": _TRANSFORMS,
        "torchvision/transforms/functional.py": _TRANSFORMS_FUNCTIONAL,
        "torchvision/transforms/v2/__init__.py": "from torchvision.transforms.v2 import functional\n",
        "torchvision/transforms/v2/functional.py": _FUNCTIONAL,
        f"torchvision-{STAND_IN_VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: torchvision\nVersion: {STAND_IN_VERSION}\n"
        ),
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def reference_video_inputs(cases: list[dict[str, Any]], scratch: Path | None = None) -> list[dict[str, Any]]:
    """transformers' processor output for each case, all in one subprocess.

    A case is a dict: ``model_path``; ``text``, one ``<|video_pad|>`` per video (and
    ``<|image_pad|>`` per image) as the chat template writes them; ``videos``, each a uint8
    ``[T, H, W, 3]`` array of frames or a video file's path (decoded with transformers' own PyAV
    reader, ``load_video(path, backend="pyav")``, all frames, its metadata attached);
    ``video_metadata``, a dict per array video (``total_num_frames``, ``fps``, ...); optionally
    ``images`` (PIL images, processed by the PIL image processor, as vlm's image path is compared)
    ``videos_kwargs`` (the video processor's call arguments: ``do_sample_frames``, ``fps``,
    ``size``, ``cap_pixels_per_frame``, ...) and ``video_processor_kwargs`` (its construction
    arguments, e.g. ``max_video_tokens``, which a call does not change).

    :return: per case, the processor's tensors (``input_ids``, ``pixel_values_videos``,
        ``video_grid_thw``, Qwen2.5-VL's ``second_per_grid_ts``, ...), ``frames_indices`` (the
        frames its video processor sampled from each video) and ``settings`` (the video
        processor's size, frame bounds and temporal patch).
    """
    import tempfile

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        request = Path(tmp) / "request.pkl"
        result = Path(tmp) / "result.pkl"
        stand_in = str(write_torchvision_stand_in(Path(tmp) / "site"))
        request.write_bytes(pickle.dumps(dict(cases=cases, stand_in=stand_in)))
        done = subprocess.run(
            [sys.executable, __file__, str(request), str(result)], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"the reference processor failed:\n{done.stderr[-4000:]}")
        return pickle.loads(result.read_bytes())


def _processor(path: str, video_processor_kwargs: dict[str, Any]) -> Any:
    import transformers
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

    processor_class = {
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
    }[AutoConfig.from_pretrained(path).model_type]
    return processor_class(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        video_processor=transformers.Qwen2VLVideoProcessor.from_pretrained(path, **video_processor_kwargs),
    )


def _run(request_path: str, result_path: str) -> None:
    request = pickle.loads(Path(request_path).read_bytes())
    sys.path.insert(0, request["stand_in"])
    import copy
    import importlib.metadata

    assert importlib.metadata.version("torchvision") == STAND_IN_VERSION  # the stand-in, not a real one
    from transformers.video_utils import load_video

    results = []
    for case in request["cases"]:
        processor = _processor(case["model_path"], case.get("video_processor_kwargs") or {})
        videos_kwargs = dict(case.get("videos_kwargs") or {})
        videos, metadata = [], []
        given = iter(case.get("video_metadata") or [])
        for video in case["videos"]:
            if isinstance(video, str):  # a file: transformers' PyAV reader, every frame
                frames, meta = load_video(video, backend="pyav")
                videos.append(frames)
                metadata.append({key: meta[key] for key in ("total_num_frames", "fps", "duration", "width", "height")})
            else:
                videos.append(video)
                metadata.append(next(given))
        outputs = processor(
            text=[case["text"]],
            images=case.get("images") or None,
            videos=videos,
            videos_kwargs=dict(video_metadata=copy.deepcopy(metadata), **videos_kwargs),
            return_tensors="pt",
        )
        result = dict(outputs.items())
        # which frames were taken: the video processor alone, asked for its metadata
        sampled = processor.video_processor(
            videos=videos, video_metadata=copy.deepcopy(metadata), return_metadata=True, **videos_kwargs
        )
        result["frames_indices"] = [  # no indices: no sampling, every frame
            list(map(int, m.frames_indices if m.frames_indices is not None else range(m.total_num_frames)))
            for m in sampled["video_metadata"]
        ]
        video_processor = processor.video_processor
        result["settings"] = dict(
            min_pixels=video_processor.size["shortest_edge"],
            max_pixels=video_processor.size["longest_edge"],
            min_frames=video_processor.min_frames,
            max_frames=video_processor.max_frames,
            temporal_patch_size=video_processor.temporal_patch_size,
        )
        results.append(result)
    Path(result_path).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _run(sys.argv[1], sys.argv[2])
