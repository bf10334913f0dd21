"""CogVLM's grounding format: ``[[x0,y0,x1,y1]]`` after the phrase it refers to, in 0..999 of the
picture (CogVLM's own demo scales by ``width / 1000``), several boxes of one phrase separated by
``;`` inside one pair of brackets: ``a dog[[100,200,300,400;500,200,700,400]]``."""

from __future__ import annotations

import re

from vlm.plugin import GroundedBox, from_normalized

_BOXES = re.compile(r"\[\[([\d\s,;]+)\]\]")
#: what ends the phrase before a box: sentence punctuation or the previous box
_PHRASE_START = re.compile(r".*[.!?;:,\n]")


def _label(before: str) -> str | None:
    """The phrase a box refers to: the text since the last punctuation before it."""
    phrase = _PHRASE_START.sub("", before).strip(" \t\"'")
    return phrase or None


def parse_boxes(text: str, image_sizes: list[tuple[int, int]]) -> list[GroundedBox]:
    """Every well-formed box in ``text``, in pixels of the (one) picture of ``image_sizes[0]``;
    none without a picture. A bracket group that is not four integers per box is skipped."""
    if not image_sizes:
        return []
    size = image_sizes[0]
    boxes: list[GroundedBox] = []
    end_of_previous = 0
    for match in _BOXES.finditer(text):
        label = _label(text[end_of_previous : match.start()])
        end_of_previous = match.end()
        for group in match.group(1).split(";"):
            numbers = [part.strip() for part in group.split(",")]
            if len(numbers) != 4 or not all(n.isdigit() for n in numbers):
                continue
            boxes.append(from_normalized(label, [int(n) for n in numbers], size, scale=1000))
    return boxes
