"""Grounding: boxes that a model writes in its answer, parsed into data and drawn on the image.

Two conventions are in use:

- Qwen2-VL writes ``<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  with coordinates normalised to 0..1000 of the image. Several boxes may follow one reference.
- Qwen2.5-VL (asked for JSON) writes ``{"bbox_2d": [x1, y1, x2, y2], "label": "the cat"}`` in
  pixels of the image the model saw (after its preprocessor resized it).

The box markers are special tokens, which detokenization usually drops, so the engine parses the
generated tokens decoded with special tokens kept (``CompletionOutput.boxes``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

NORMALIZED_1000: Final = "normalized_1000"
PIXELS: Final = "pixels"

BOX_START = "<|box_start|>"
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_BOX = re.compile(
    r"<\|box_start\|>\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>"
)
_JSON_OBJECT = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}", re.S)


@dataclass(frozen=True)
class GroundedBox:
    """One box from the model's answer.

    :param label: the referred object (``None`` when the model gave none).
    :param box: ``(x1, y1, x2, y2)`` as the model wrote them.
    :param space: ``"normalized_1000"`` (Qwen2-VL) or ``"pixels"`` of the image the model saw.
    """

    label: str | None
    box: tuple[float, float, float, float]
    space: Literal["normalized_1000", "pixels"]

    def to_image(
        self, image_size: tuple[int, int], model_image_size: tuple[int, int] | None = None
    ) -> tuple[float, float, float, float]:
        """The box in pixels of the original image of ``image_size`` (width, height).

        Pixel boxes are scaled from ``model_image_size`` (the size the preprocessor resized the
        image to) when it is given.
        """
        width, height = image_size
        x1, y1, x2, y2 = self.box
        if self.space == NORMALIZED_1000:
            sx, sy = width / 1000, height / 1000
        elif model_image_size:
            sx, sy = width / model_image_size[0], height / model_image_size[1]
        else:
            sx = sy = 1.0
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def parse_boxes(text: str) -> list[GroundedBox]:
    """Every box in ``text``, in order, in either convention (see the module docstring)."""
    boxes: list[GroundedBox] = []
    label: str | None = None
    refs = [(m.start(), m.group(1).strip()) for m in _REF.finditer(text)]
    for match in _BOX.finditer(text):
        # a box belongs to the latest object reference before it
        earlier = [name for start, name in refs if start < match.start()]
        label = earlier[-1] if earlier else None
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        boxes.append(GroundedBox(label, (x1, y1, x2, y2), NORMALIZED_1000))
    for match in _JSON_OBJECT.finditer(text):
        try:
            item = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        coords = item.get("bbox_2d")
        if isinstance(coords, list) and len(coords) == 4 and all(isinstance(v, (int, float)) for v in coords):
            name = item.get("label")
            x1, y1, x2, y2 = (float(v) for v in coords)
            boxes.append(GroundedBox(str(name) if name is not None else None, (x1, y1, x2, y2), PIXELS))
    return boxes


def draw_boxes(image: Any, boxes: list[GroundedBox], model_image_size: tuple[int, int] | None = None) -> Any:
    """A copy of the PIL ``image`` with each box outlined and labelled."""
    from PIL import ImageDraw

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colors = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]
    line = max(1, round(min(canvas.size) / 200))
    for i, grounded in enumerate(boxes):
        x1, y1, x2, y2 = grounded.to_image(canvas.size, model_image_size)
        color = colors[i % len(colors)]
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=line)
        if grounded.label:
            draw.text((min(x1, x2) + line, min(y1, y2) + line), grounded.label, fill=color)
    return canvas
