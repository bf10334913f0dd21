"""Grounding: the boxes a model writes in its answer, as data, and drawn on the picture.

Each family writes boxes its own way (Qwen2-VL ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in
0..1000, Qwen2.5-VL JSON ``bbox_2d`` in pixels of its resized picture, InternVL
``<ref>..</ref><box>[[..]]</box>`` in 0..1000, CogVLM ``[[x0,y0,x1,y1]]`` in 0..999), so parsing
lives in the plugin that knows the format: its ``parse_grounding`` hook (:mod:`vlm.hookspecs`)
returns :class:`GroundedBox` es in pixels of the original picture. The engine calls it on the
chosen plugin when a request finishes (``CompletionOutput.boxes``). This module holds the data
type, the conversions plugins share (:func:`from_normalized`, :func:`from_resized`) and
:func:`draw_boxes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

NORMALIZED_1000: Final = "normalized_1000"
PIXELS: Final = "pixels"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundedBox:
    """One box from the model's answer.

    :param label: the referred object (``None`` when the model gave none).
    :param box: ``(x1, y1, x2, y2)``.
    :param space: ``"pixels"`` of the original picture (what ``parse_grounding`` returns), or
        ``"normalized_1000"`` (0..1000 of the picture).
    """

    label: str | None
    box: Box
    space: Literal["normalized_1000", "pixels"] = PIXELS

    def to_image(self, image_size: tuple[int, int], model_image_size: tuple[int, int] | None = None) -> Box:
        """The box in pixels of the original image of ``image_size`` (width, height).

        Pixel boxes are scaled from ``model_image_size`` (the size a preprocessor resized the
        image to) when it is given, and are returned as they are otherwise.
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


def from_normalized(
    label: str | None, box: Sequence[float], image_size: tuple[int, int], scale: float = 1000
) -> GroundedBox:
    """A box written in ``0..scale`` of the picture (Qwen2-VL and InternVL: 1000), in pixels of
    the picture of ``image_size`` (width, height)."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return GroundedBox(label, (x1 * width / scale, y1 * height / scale, x2 * width / scale, y2 * height / scale))


def from_resized(
    label: str | None, box: Sequence[float], resized_size: tuple[int, int], image_size: tuple[int, int]
) -> GroundedBox:
    """A box in pixels of the picture as the model saw it (resized to ``resized_size`` by the
    preprocessor, e.g. Qwen2.5-VL), in pixels of the original picture of ``image_size``."""
    sx, sy = image_size[0] / resized_size[0], image_size[1] / resized_size[1]
    x1, y1, x2, y2 = (float(v) for v in box)
    return GroundedBox(label, (x1 * sx, y1 * sy, x2 * sx, y2 * sy))


#: outline colours, box by box (the first is (230, 25, 75))
COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]


def draw_boxes(image: Any, boxes: list[GroundedBox], model_image_size: tuple[int, int] | None = None) -> Any:
    """A copy of the PIL ``image`` with each box outlined (in :data:`COLORS`, in turn) and labelled.

    The outline is ``max(1, round(min(width, height) / 200))`` pixels wide, drawn inwards from the
    box's edges."""
    from PIL import ImageDraw

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 200))
    for i, grounded in enumerate(boxes):
        x1, y1, x2, y2 = grounded.to_image(canvas.size, model_image_size)
        color = COLORS[i % len(COLORS)]
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=line)
        if grounded.label:
            draw.text((min(x1, x2) + line, min(y1, y2) + line), grounded.label, fill=color)
    return canvas


__all__ = ["COLORS", "NORMALIZED_1000", "PIXELS", "GroundedBox", "draw_boxes", "from_normalized", "from_resized"]
